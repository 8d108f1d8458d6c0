"""One-shot, idempotent: create the non-admin trainer account through the server's auth API.

Runs after the MLflow server is healthy, with the admin credentials. When the account exists,
its password is set to the configured one, so rotating MLFLOW_TRAINER_PASSWORD in the
environment and re-running the job is how a password is changed.
"""

from __future__ import annotations

import os
import time

import requests

from mlstack import settings as s


def log(message: str) -> None:
    print(f"[users-init] {message}", flush=True)


def server_url(env: dict[str, str]) -> str:
    """The server as this job reaches it: the public URL natively, the service name in compose."""
    return s.MLFLOW_INTERNAL_URL.get(env) or s.MLFLOW_PUBLIC_URL.get(env)


def wait_for_health(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/health", timeout=3).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"users init: MLflow server at {url} not healthy after {timeout:.0f}s")
        time.sleep(1)


def ensure_user(url: str, admin: tuple[str, str], username: str, password: str) -> str:
    api = f"{url}/api/2.0/mlflow/users"
    got = requests.get(f"{api}/get", params={"username": username}, auth=admin, timeout=10)
    if got.status_code == 401:
        raise SystemExit("users init: the MLflow server rejects MLFLOW_ADMIN_USER/MLFLOW_ADMIN_PASSWORD")
    if got.status_code == 200:
        resp = requests.patch(f"{api}/update-password", json={"username": username, "password": password}, auth=admin, timeout=10)
        action = "updated password of"
    else:
        resp = requests.post(f"{api}/create", json={"username": username, "password": password}, auth=admin, timeout=10)
        action = "created"
    if resp.status_code != 200:
        raise SystemExit(f"users init: could not set up user {username}: HTTP {resp.status_code} {resp.text[:300]}")
    log(f"{action} user {username}")
    return action


def run(env: dict[str, str]) -> None:
    url = server_url(env).rstrip("/")
    wait_for_health(url)
    admin = (s.MLFLOW_ADMIN_USER.get(env), s.MLFLOW_ADMIN_PASSWORD.get(env))
    ensure_user(url, admin, s.MLFLOW_TRAINER_USER.get(env), s.MLFLOW_TRAINER_PASSWORD.get(env))


def main() -> None:
    try:
        run(dict(os.environ))
    except s.SettingsError as exc:
        raise SystemExit(f"users init: {exc}") from None


if __name__ == "__main__":
    main()
