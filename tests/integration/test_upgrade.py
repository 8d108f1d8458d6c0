"""Upgrading MLflow with data an older MLflow wrote: the stack ran MLflow 3.16.1 (its plain server
with basic auth), then ``mlstack upgrade`` (make stack-upgrade) moved it to our pin.

Before and after, through the old client and through ours: the same experiments, runs, params,
every metric's history, artifacts (sha256 through the server and every object in the bucket),
the registered model, both users' logins and what each may do; every row of both databases
compares equal on the columns the old schema had. Without the procedure, our server refuses the
old schema and migrates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest
import requests

from mlstack import schema_state
from mlstack import settings as s
from mlstack.native import postgres
from mlstack.native.processes import free_port, port_open, spawn, stop_tree, wait_until
from mlstack.native.stack import Stack
from mlstack.schema_state import Standing

from old_mlflow import OLD_MLFLOW, OldMlflowUnavailable, old_mlflow_python, run_client, start_old_server

@pytest.fixture
def old_python() -> Path:
    try:
        return old_mlflow_python()
    except OldMlflowUnavailable as exc:
        pytest.fail(str(exc))  # a failure, not a skip: the upgrade would go untested


@pytest.fixture
def fresh_stack(monkeypatch):
    """A stack of its own (the session's already has our schema), on free ports."""
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-upgrade-"))
    for var in ("STACK_DB_PORT", "STACK_S3_PORT", "STACK_MLFLOW_PORT"):
        monkeypatch.setenv(var, str(free_port()))
    try:
        yield Stack(state_dir)
    finally:
        Stack(state_dir).down()
        shutil.rmtree(state_dir, ignore_errors=True)


def uris(env: dict[str, str]) -> tuple[str, str]:
    return s.backend_store_uri(env), s.backend_store_uri(env, s.MLFLOW_AUTH_DB.get(env))


def table_rows(env: dict[str, str], database: str) -> dict[str, dict]:
    """Every table's columns and rows (as text, sorted), but the alembic revision tables."""
    conn = psycopg2.connect(host=env["DB_HOST"], port=int(env["DB_PORT"]), user=env["POSTGRES_USER"],
                            password=env["POSTGRES_PASSWORD"], dbname=database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position")
            columns: dict[str, list[str]] = {}
            for table, column in cur.fetchall():
                columns.setdefault(table, []).append(column)
            out = {}
            for table, cols in columns.items():
                if table.startswith("alembic_version"):
                    continue
                cur.execute(f'SELECT {", ".join(f"""CAST("{c}" AS text)""" for c in cols)} FROM "{table}"')
                out[table] = {"columns": cols, "rows": sorted(cur.fetchall(), key=repr)}
            return out
    finally:
        conn.close()


def compare_rows(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """What a migration changed of the data ``before`` held: a table gone, a row changed on the
    columns both schemas have, or a dropped column that held data. New tables and columns are fine."""
    problems = []
    for table, old in before.items():
        if table not in after:
            problems.append(f"table {table} is gone")
            continue
        new = after[table]
        kept = [c for c in old["columns"] if c in new["columns"]]
        for column in set(old["columns"]) - set(kept):
            position = old["columns"].index(column)
            if any(row[position] is not None for row in old["rows"]):
                problems.append(f"{table}.{column} held data and was dropped")

        def project(rows, columns):
            return sorted((tuple(row[columns.index(c)] for c in kept) for row in rows), key=repr)

        was, now = project(old["rows"], old["columns"]), project(new["rows"], new["columns"])
        if was != now:
            problems.append(f"rows of {table} ({', '.join(kept)}) changed: "
                            f"{[r for r in was if r not in now]} became {[r for r in now if r not in was]}")
    return problems


def bucket_digests(env: dict[str, str]) -> dict[str, str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id=env["S3_ROOT_USER"],
                      aws_secret_access_key=env["S3_ROOT_PASSWORD"], region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["S3_BUCKET"]):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=env["S3_BUCKET"], Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def test_upgrade_from_an_older_mlflow_keeps_everything(fresh_stack, old_python):
    stack = fresh_stack
    env = stack.up(services=("postgres", "s3"))
    postgres.ensure_database(int(env["DB_PORT"]), env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                             env["MLFLOW_AUTH_DB"])
    uri, admin, admin_pw = env["MLFLOW_PUBLIC_URL"], env["MLFLOW_ADMIN_USER"], env["MLFLOW_ADMIN_PASSWORD"]

    # The old stack: MLflow 3.16.1's own server where ours runs, recorded as the stack's server so
    # the upgrade stops it as it would stop ours; our users-init made the trainer account on it.
    old_server = start_old_server(old_python, env, stack.state_dir, int(env["MLFLOW_PORT"]))
    stack._record("mlflow", old_server)
    stack._run_job("users-init", env)
    run_client(old_python, "write", uri, admin, admin_pw)
    before = run_client(old_python, "snapshot", uri, admin, admin_pw)
    assert before["access"] == {
        "admin login": 200, "alice login": 200, "alice wrong password": 401, "alice sets a tag on her run": 200,
        "alice reads the admin's run": 200, "alice logs into the admin's run": 403,
        "alice tags the admin's experiment": 403,
    }
    assert len(before["runs"]) == 3 and before["models"][0]["versions"][0]["version"] == "1"
    old_states = schema_state.inspect(*uris(env))
    assert [st.standing for st in old_states] == [Standing.BEHIND, Standing.CURRENT], \
        "3.16.1's tracking schema should be behind ours, its auth schema the same"
    stack.down(only={"mlflow"})
    rows_before = {db: table_rows(env, env[var]) for db, var in (("tracking", "POSTGRES_DB"), ("auth", "MLFLOW_AUTH_DB"))}
    objects_before = bucket_digests(env)

    # Our server on the old schema, without the procedure: refused, naming it; nothing migrated.
    with pytest.raises(RuntimeError) as refused:
        stack.up()
    assert "refusing to start" in str(refused.value) and "make stack-upgrade" in str(refused.value)
    assert schema_state.inspect(*uris(env))[0].revision == old_states[0].revision

    # The procedure (make stack-upgrade), with the old server running again as before an upgrade.
    stack._record("mlflow", start_old_server(old_python, env, stack.state_dir, int(env["MLFLOW_PORT"])))
    backups = stack.state_dir / "backups"
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mlstack.native.cli", "--state-dir", str(stack.state_dir),
                             "upgrade", "--into", str(backups)], capture_output=True, text=True, cwd=stack.state_dir)
    seconds = time.monotonic() - began
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr

    new_states = schema_state.inspect(*uris(env))
    assert [st.standing for st in new_states] == [Standing.CURRENT, Standing.CURRENT]
    (backup,) = backups.iterdir()
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["databases"]["tracking"]["schema_revision"] == old_states[0].revision

    rows_after = {db: table_rows(env, env[var]) for db, var in (("tracking", "POSTGRES_DB"), ("auth", "MLFLOW_AUTH_DB"))}
    # users-init sets the stack's own trainer account's password at every start (a new salt, so a
    # new hash), upgrade or not; that account's login is checked through the server instead.
    for rows in (rows_before, rows_after):
        users = rows["auth"]["users"]
        name, hashed = users["columns"].index("username"), users["columns"].index("password_hash")
        users["rows"] = [row[:hashed] + ("(set at start)",) + row[hashed + 1:] if row[name] == env["MLFLOW_TRAINER_USER"]
                         else row for row in users["rows"]]
    for db in rows_before:
        assert compare_rows(rows_before[db], rows_after[db]) == [], db
    assert bucket_digests(env) == objects_before
    trainer = (env["MLFLOW_TRAINER_USER"], env["MLFLOW_TRAINER_PASSWORD"])
    assert requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, auth=trainer,
                        timeout=30).status_code == 200
    assert run_client(old_python, "snapshot", uri, admin, admin_pw) == before  # an old client, after
    assert run_client(Path(sys.executable), "snapshot", uri, admin, admin_pw) == before  # ours

    steps = "; ".join(line for line in result.stdout.splitlines() if ": done in " in line)
    print(f"upgrade {OLD_MLFLOW} -> {_installed()} of {len(objects_before)} objects: {seconds:.1f}s ({steps})")


def _installed() -> str:
    from importlib.metadata import version

    return version("mlflow")


def test_a_database_written_by_a_newer_mlflow_is_refused_and_left_alone(native_stack):
    """A revision the installed MLflow does not know (a newer MLflow's, or a restore of its backup):
    check and migrate refuse, naming it, and change nothing."""
    env = {**native_stack.env, "POSTGRES_DB": "upgrade_newer", "MLFLOW_AUTH_DB": "upgrade_newer_auth"}
    for name in ("upgrade_newer", "upgrade_newer_auth"):
        postgres.ensure_database(int(env["DB_PORT"]), env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], name)
    conn = psycopg2.connect(host=env["DB_HOST"], port=int(env["DB_PORT"]), user=env["POSTGRES_USER"],
                            password=env["POSTGRES_PASSWORD"], dbname="upgrade_newer")
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        cur.execute("INSERT INTO alembic_version VALUES ('f00dfeedbeef')")
        cur.execute("CREATE TABLE experiments (experiment_id integer PRIMARY KEY)")
    conn.close()
    for step in ("check", "migrate"):
        result = subprocess.run([sys.executable, "-m", "mlstack.upgrade", step], capture_output=True, text=True,
                                env=s.service_environment("mlflow", env, env))
        assert result.returncode == 1, result.stdout + result.stderr
        assert ("upgrade refused: tracking database: at revision f00dfeedbeef, which the installed MLflow does "
                "not know") in result.stderr and "a newer MLflow wrote it" in result.stderr, result.stderr
    tracking, auth = schema_state.inspect(*uris(env))
    assert (tracking.standing, tracking.revision) == (Standing.UNKNOWN, "f00dfeedbeef")
    assert auth.standing is Standing.FRESH  # not migrated either


def test_an_auth_database_behind_is_refused_by_the_server_and_migrated_by_the_upgrade(native_stack):
    """MLflow migrates its auth database by itself whenever it opens it; our server must not (no
    backup would precede it), and the upgrade's migrate step must. 3.16.1's auth schema equals
    3.17.2's, so this one is made at an older revision with MLflow's own auth migrations."""
    env = {**native_stack.env, "POSTGRES_DB": "upgrade_auth_behind", "MLFLOW_AUTH_DB": "upgrade_auth_behind_auth"}
    for name in (env["POSTGRES_DB"], env["MLFLOW_AUTH_DB"]):
        postgres.ensure_database(int(env["DB_PORT"]), env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], name)
    tracking_uri, auth_uri = uris(env)
    older = "c3d4e5f6a7b8"  # add_rbac_tables: two auth migrations before 3.17.2's head
    subprocess.run([sys.executable, "-m", "mlflow.server.auth", "db", "upgrade", "--url", auth_uri, "--revision", older],
                   check=True, capture_output=True)
    assert schema_state.inspect(tracking_uri, auth_uri)[1].standing is Standing.BEHIND

    port = free_port()
    log = native_stack.stack.state_dir / "logs" / "upgrade-auth-behind.log"
    server = spawn([sys.executable, "-m", s.SERVICE_MODULES["mlflow"]], log_path=log,
                   env=s.service_environment("mlflow", {**env, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}, env))
    try:
        wait_until(lambda: not server.alive() or port_open(port), what="the server's exit or start", timeout=300)
    finally:
        serving = server.alive()
        stop_tree(server)
    output = log.read_text()
    assert not serving, "the server started on an auth database that is behind:\n" + output[-3000:]
    assert (f"refusing to start: auth database: at {older}, 2 migration(s) behind the installed MLflow's"
            in output and "make stack-upgrade" in output), output[-3000:]
    assert schema_state.inspect(tracking_uri, auth_uri)[1].revision == older

    migrate = subprocess.run([sys.executable, "-m", "mlstack.upgrade", "migrate"], capture_output=True, text=True,
                             env=s.service_environment("mlflow", env, env))
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert f"migrating the auth database: {older} ->" in migrate.stdout
    assert [st.standing for st in schema_state.inspect(tracking_uri, auth_uri)] == [Standing.FRESH, Standing.CURRENT]


def test_prepare_makes_an_empty_database_ready_once_for_servers_that_start_together(native_stack):
    """The Kubernetes migration Job (infra/k8s) on a first install: an empty database and no auth
    database. ``prepare`` leaves both schemas at the revisions the session's server runs on, with
    the admin account made, so the replicas that start after it create nothing. (On a later
    deploy it finds them current and does what every server start does on them; one run here
    keeps make test short.)"""
    env = {**native_stack.env, "POSTGRES_DB": "prepare_empty", "MLFLOW_AUTH_DB": "prepare_empty_auth"}
    postgres.ensure_database(int(env["DB_PORT"]), env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    result = subprocess.run([sys.executable, "-m", "mlstack.upgrade", "prepare"], capture_output=True, text=True,
                            env=s.service_environment("mlflow", env, env), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    def query(environment: dict[str, str], database: str, sql: str) -> list[tuple]:
        conn = psycopg2.connect(host=environment["DB_HOST"], port=int(environment["DB_PORT"]), dbname=database,
                                user=environment["POSTGRES_USER"], password=environment["POSTGRES_PASSWORD"])
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    # Read straight from PostgreSQL (importing MLflow's migrations here would cost seconds).
    for db, table in (("POSTGRES_DB", schema_state.TRACKING_VERSION_TABLE),
                      ("MLFLOW_AUTH_DB", schema_state.AUTH_VERSION_TABLE)):
        prepared = query(env, env[db], f"SELECT version_num FROM {table}")
        assert prepared == query(native_stack.env, native_stack.env[db], f"SELECT version_num FROM {table}"), db
    assert query(env, env["MLFLOW_AUTH_DB"], "SELECT username, is_admin FROM users") == [(env["MLFLOW_ADMIN_USER"], True)]


def test_an_upgrade_to_an_mlflow_a_patch_does_not_take_hold_on_is_refused_before_anything_changes(
        native_stack, tmp_path):
    """The new MLflow moved a route a patch replaces (test_patches_in_effect's import hook): the check
    names the patch, and the running server, the databases and the backups are left as they were."""
    from test_patches_in_effect import MOVE_DOWNLOAD_ROUTES

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(MOVE_DOWNLOAD_ROUTES)
    stack = native_stack.stack
    server_before = stack.handle("mlflow")
    states_before = schema_state.inspect(*uris(native_stack.env))
    backups = tmp_path / "backups"
    result = subprocess.run([sys.executable, "-m", "mlstack.native.cli", "--state-dir", str(stack.state_dir),
                             "upgrade", "--into", str(backups)], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(hook)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "upgrade stopped at 'check'" in result.stderr, result.stderr
    assert "building its app failed" in result.stderr and "Nothing was changed" in result.stderr, result.stderr
    assert "patch streaming_download did not take hold" in result.stderr, result.stderr
    assert Stack(stack.state_dir).handle("mlflow") == server_before and server_before.alive()
    assert schema_state.inspect(*uris(native_stack.env)) == states_before
    assert not backups.exists()

    # Allowed by the operator (MLSTACK_ALLOW_UNPATCHED), the check lets the upgrade go on, saying so.
    allowed = subprocess.run([sys.executable, "-m", "mlstack.upgrade", "check"], capture_output=True, text=True,
                             env={**s.service_environment("mlflow", native_stack.env, os.environ),
                                  "PYTHONPATH": str(hook), "MLSTACK_ALLOW_UNPATCHED": "streaming_download"})
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "[upgrade] WARNING: " in allowed.stdout and "RUNNING WITHOUT PATCH streaming_download" in allowed.stdout
    assert "the other server patches take hold" in allowed.stdout
