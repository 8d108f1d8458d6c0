"""One account per person (issue 12, item 3), on the real server of the test session.

Accounts are made with the command `make user NAME=...` runs (``mlstack user``, which runs the
users-init entrypoint compose runs for `make compose-user`); the default permission a team gets
is READ: a teammate reads another's runs and cannot change or delete them; and only admins see
who has an account.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid

import pytest
import requests
from mlflow.server.auth import routes

from mlstack import settings as s

PASSWORD_LINE = re.compile(r"^  export MLFLOW_TRACKING_PASSWORD=(\S+)$", re.M)


def mlstack_user(native_stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`make user NAME=...` on the test session's stack (the recipe runs exactly this)."""
    return subprocess.run(
        [sys.executable, "-m", "mlstack.native.cli", "--state-dir", str(native_stack.stack.state_dir),
         "--env-file", "/nonexistent", "user", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def new_person(native_stack, prefix: str) -> tuple[str, str]:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    proc = mlstack_user(native_stack, name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return name, PASSWORD_LINE.search(proc.stdout).group(1)


def api(native_stack, method: str, path: str, auth, **kwargs) -> requests.Response:
    return requests.request(method, f"{native_stack.uri}/api/2.0/mlflow/{path}", auth=auth, timeout=30, **kwargs)


def test_make_user_creates_an_account_and_shows_its_password_once(native_stack):
    name = f"alice-{uuid.uuid4().hex[:6]}"
    proc = mlstack_user(native_stack, name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Created user {name} on {native_stack.uri}" in proc.stdout
    assert f"export MLFLOW_TRACKING_USERNAME={name}" in proc.stdout
    password = PASSWORD_LINE.search(proc.stdout).group(1)
    me = api(native_stack, "GET", "users/current", (name, password))
    assert me.status_code == 200 and me.json()["user"] == {"id": me.json()["user"]["id"], "username": name,
                                                           "is_admin": False}
    # Shown once: nothing the stack keeps on disk holds it (the job log included).
    for path in native_stack.stack.state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000 and "postgres" not in path.parts:
            assert password.encode() not in path.read_bytes(), path

    again = mlstack_user(native_stack, name)
    assert again.returncode == 0
    assert f"User {name} already exists" in again.stdout and "nothing changed" in again.stdout
    assert "MLFLOW_TRACKING_PASSWORD" not in again.stdout
    assert api(native_stack, "GET", "users/current", (name, password)).status_code == 200

    reset = mlstack_user(native_stack, name, "--reset-password")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    new_password = PASSWORD_LINE.search(reset.stdout).group(1)
    assert new_password != password
    assert api(native_stack, "GET", "users/current", (name, new_password)).status_code == 200


def test_a_password_given_on_stdin(native_stack):
    name = f"carol-{uuid.uuid4().hex[:6]}"
    proc = mlstack_user(native_stack, name, "--password-stdin", stdin="chosen-by-carol-1234\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert api(native_stack, "GET", "users/current", (name, "chosen-by-carol-1234")).status_code == 200
    short = mlstack_user(native_stack, f"dave-{uuid.uuid4().hex[:6]}", "--password-stdin", stdin="short\n")
    assert short.returncode != 0 and "at least 12 characters" in short.stderr


@pytest.mark.parametrize("name, error", [
    ("bad name", "is not a valid username"),
    (".hidden", "is not a valid username"),
    ("trainer", "is the stack's own account; its password is MLFLOW_TRAINER_PASSWORD"),
    ("admin", "is the stack's own account; its password is MLFLOW_ADMIN_PASSWORD"),
])
def test_bad_or_reserved_names_are_refused(native_stack, name, error):
    proc = mlstack_user(native_stack, name)
    assert proc.returncode != 0
    assert error in proc.stderr


def test_only_the_admin_credentials_create_accounts(native_stack):
    person, password = new_person(native_stack, "mallory")
    env = s.service_environment("users-init", {**native_stack.env, "MLFLOW_ADMIN_USER": person,
                                               "MLFLOW_ADMIN_PASSWORD": password}, {"PATH": ""})
    proc = subprocess.run([sys.executable, "-m", "mlstack.users_init", "--add", f"eve-{uuid.uuid4().hex[:6]}"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "rejects MLFLOW_ADMIN_USER/MLFLOW_ADMIN_PASSWORD (HTTP 403)" in proc.stderr


def test_default_permission_read_a_teammate_reads_but_cannot_change_or_delete(native_stack):
    alice, bob = new_person(native_stack, "alice"), new_person(native_stack, "bob")
    exp = api(native_stack, "POST", "experiments/create", alice, json={"name": f"alice-{uuid.uuid4().hex[:6]}"})
    assert exp.status_code == 200, exp.text
    run = api(native_stack, "POST", "runs/create", alice, json={"experiment_id": exp.json()["experiment_id"]})
    assert run.status_code == 200, run.text
    run_id = run.json()["run"]["info"]["run_id"]

    assert api(native_stack, "GET", "runs/get", bob, params={"run_id": run_id}).status_code == 200
    metric = {"run_id": run_id, "key": "loss", "value": 1.0, "timestamp": 0, "step": 0}
    assert api(native_stack, "POST", "runs/log-metric", bob, json=metric).status_code == 403
    assert api(native_stack, "POST", "runs/set-tag", bob, json={"run_id": run_id, "key": "k", "value": "v"}).status_code == 403
    assert api(native_stack, "POST", "runs/delete", bob, json={"run_id": run_id}).status_code == 403
    assert api(native_stack, "POST", "experiments/delete", bob,
               json={"experiment_id": exp.json()["experiment_id"]}).status_code == 403
    # Nothing was lost, and the owner still does all of it.
    assert api(native_stack, "GET", "runs/get", alice, params={"run_id": run_id}).json()["run"]["info"][
        "lifecycle_stage"] == "active"
    assert api(native_stack, "POST", "runs/log-metric", alice, json=metric).status_code == 200
    assert api(native_stack, "POST", "runs/delete", alice, json={"run_id": run_id}).status_code == 200


def test_a_non_admin_cannot_list_users(native_stack):
    bob = new_person(native_stack, "bob")
    for prefix in ("/api/2.0", "/ajax-api/2.0"):
        url = f"{native_stack.uri}{prefix}/mlflow/users/list"
        assert requests.get(url, auth=bob, timeout=30).status_code == 403
        listed = requests.get(url, auth=native_stack.admin_auth, timeout=30)
        assert listed.status_code == 200 and bob[0] in {u["username"] for u in listed.json()["users"]}


def test_no_route_of_the_auth_app_shows_a_non_admin_another_account(native_stack):
    """Every GET route MLflow's auth app declares, asked by bob about alice: none names alice."""
    alice, _ = new_person(native_stack, "alice")
    bob = new_person(native_stack, "bob")
    # The LLM gateway's catalog routes hold no account data (and list every provider's models: slow).
    paths = sorted({v for k, v in vars(routes).items() if k.isupper() and isinstance(v, str) and v.startswith("/")
                    and "/gateway/" not in v})
    assert any(p.endswith("/users/list") for p in paths)
    leaks = []
    for path in paths:
        for params in ({}, {"username": alice}, {"user_name": alice}, {"role_id": "1"}):
            resp = requests.get(f"{native_stack.uri}{path}", params=params, auth=bob, timeout=30)
            if resp.status_code == 200 and alice in resp.text:
                leaks.append((path, params))
    assert leaks == []
