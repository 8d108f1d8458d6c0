"""Accounts, made through the server's auth API with the admin credentials.

Without arguments (the one-shot job compose and the native launcher run after the server is
healthy): create the non-admin trainer account ``make train`` and ``make demo`` use on this
machine. When it exists, its password is set to the configured one, so rotating
MLFLOW_TRAINER_PASSWORD and re-running the job is how that password is changed.

``--add NAME``: one account per person (``make user NAME=alice`` natively,
``make compose-user NAME=alice`` in compose: the same module, the same variables). The password is
generated (or read from stdin with ``--password-stdin``), printed once and stored nowhere but in
the server's hash. An account that exists is left as it is and the command says so;
``--reset-password`` gives it a new one. What a person may do with others' experiments is
MLFLOW_DEFAULT_PERMISSION, the server's setting.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
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


# -- one account per person -------------------------------------------------------------------------

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
GENERATED_PASSWORD_BYTES = 18  # 24 characters; MLflow asks for at least 12


def add_person(env: dict[str, str], username: str, *, password: str | None = None,
               reset_password: bool = False) -> str | None:
    """Create ``username`` (or give it a new password); returns the password set, None if nothing changed."""
    if not USERNAME.fullmatch(username):
        raise SystemExit(f"users: {username!r} is not a valid username: 1-64 letters, digits, '.', '_', '@' "
                         "or '-', starting with a letter or digit")
    managed = {s.MLFLOW_ADMIN_USER.get(env): "MLFLOW_ADMIN_PASSWORD", s.MLFLOW_TRAINER_USER.get(env): "MLFLOW_TRAINER_PASSWORD"}
    if username in managed:
        raise SystemExit(f"users: {username!r} is the stack's own account; its password is {managed[username]} "
                         "in .env (or .stack/secrets.env), set when the stack starts")
    url = server_url(env).rstrip("/")
    admin = (s.MLFLOW_ADMIN_USER.get(env), s.MLFLOW_ADMIN_PASSWORD.get(env))
    api = f"{url}/api/2.0/mlflow/users"
    try:
        got = requests.get(f"{api}/get", params={"username": username}, auth=admin, timeout=30)
    except requests.RequestException as exc:
        raise SystemExit(f"users: the MLflow server at {url} is unreachable: {exc}") from None
    if got.status_code in (401, 403):
        raise SystemExit(f"users: the MLflow server at {url} rejects MLFLOW_ADMIN_USER/MLFLOW_ADMIN_PASSWORD "
                         f"(HTTP {got.status_code}): creating accounts takes the admin's credentials")
    if got.status_code not in (200, 404):
        raise SystemExit(f"users: could not look up user {username}: HTTP {got.status_code} {got.text[:300]}")
    exists = got.status_code == 200
    if exists and not reset_password:
        print(f"User {username} already exists on {url}; nothing changed "
              "(--reset-password gives it a new password).")
        return None
    password = password if password is not None else secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
    if exists:
        resp = requests.patch(f"{api}/update-password", json={"username": username, "password": password},
                              auth=admin, timeout=30)
    else:
        resp = requests.post(f"{api}/create", json={"username": username, "password": password}, auth=admin,
                             timeout=30)
    if resp.status_code != 200:
        raise SystemExit(f"users: could not {'update' if exists else 'create'} user {username}: "
                         f"HTTP {resp.status_code} {resp.text[:300]}")
    print(f"{'New password for' if exists else 'Created'} user {username} on {url}.")
    print("Hand these to them; the password is shown only now (the server keeps only its hash):")
    print(f"  export MLFLOW_TRACKING_URI={s.MLFLOW_PUBLIC_URL.get(env)}")
    print(f"  export MLFLOW_TRACKING_USERNAME={username}")
    print(f"  export MLFLOW_TRACKING_PASSWORD={password}")
    return password


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlstack.users_init", description=__doc__.split("\n\n")[0])
    parser.add_argument("--add", metavar="NAME", help="create the account of one person (prints its password once)")
    parser.add_argument("--reset-password", action="store_true", help="with --add: give an existing account a new password")
    parser.add_argument("--password-stdin", action="store_true",
                        help="with --add: read the password from stdin instead of generating one")
    args = parser.parse_args(argv)
    if (args.reset_password or args.password_stdin) and not args.add:
        parser.error("--reset-password and --password-stdin go with --add NAME")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = dict(os.environ)
    try:
        if args.add is None:
            run(env)
            return
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
        add_person(env, args.add, password=password, reset_password=args.reset_password)
    except s.SettingsError as exc:
        raise SystemExit(f"users init: {exc}") from None


if __name__ == "__main__":
    main()
