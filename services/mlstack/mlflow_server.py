"""Entrypoint of the MLflow tracking server (compose image and native launcher alike).

Steps: wait for PostgreSQL, create the auth database if needed, check both schemas (created
when empty, never migrated here: ``mlstack.upgrade`` does that after a backup), read the
bucket-scoped S3 key the storage init job wrote, bootstrap the admin account, then exec gunicorn.

Why not ``mlflow server --gunicorn-opts``: since MLflow 3.5 that switches to the Flask app and
drops the FastAPI security middleware (Host-header and CORS checks). Here gunicorn stays the
process manager but runs uvicorn workers that serve MLflow's FastAPI app with basic auth
(``mlflow.server.auth:create_app`` returns the FastAPI app when ``_MLFLOW_SGI_NAME=uvicorn``), and
the environment is prepared the way ``mlflow server`` prepares it for its workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from mlstack import settings as s


def log(message: str) -> None:
    print(f"[mlflow-entrypoint] {message}", flush=True)


def wait_for_database(env: dict[str, str], timeout: float = 120.0) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            psycopg2.connect(
                host=s.DB_HOST.get(env), port=s.DB_PORT.get_int(env), user=s.POSTGRES_USER.get(env),
                password=s.POSTGRES_PASSWORD.get(env), dbname=s.POSTGRES_DB.get(env), connect_timeout=3,
            ).close()
            return
        except psycopg2.OperationalError as exc:
            last_error = exc
            time.sleep(1)
    raise SystemExit(
        f"PostgreSQL at {s.DB_HOST.get(env)}:{s.DB_PORT.get(env)} not reachable after {timeout:.0f}s: {last_error}"
    )


def _connect_to_main_database(env: dict[str, str]):
    """An autocommit connection to the tracking database, the one that always exists."""
    import psycopg2

    conn = psycopg2.connect(
        host=s.DB_HOST.get(env), port=s.DB_PORT.get_int(env), user=s.POSTGRES_USER.get(env),
        password=s.POSTGRES_PASSWORD.get(env), dbname=s.POSTGRES_DB.get(env),
    )
    conn.autocommit = True
    return conn


def ensure_database(env: dict[str, str], name: str) -> None:
    """CREATE DATABASE is not idempotent in PostgreSQL, hence the lookup first."""
    conn = _connect_to_main_database(env)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                log(f"creating database {name}")
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


# Key of the PostgreSQL advisory lock every server instance takes around its start-up writes (the
# auth database, both schemas, the admin account). Any fixed 64-bit number nobody else uses.
INIT_LOCK_KEY = 0x6D6C737461636B  # "mlstack"


@contextmanager
def initialisation_lock(env: dict[str, str]):
    """Only one server instance at a time creates databases and schemas.

    Several instances started together on an empty database would each find it empty and each run
    MLflow's table creation: the loser fails on a duplicate table or alembic revision, or both
    half-succeed (a known MLflow failure). The lock is PostgreSQL's, on the database that always
    exists, held for the session: a crashed instance's lock ends with its connection.
    """
    conn = _connect_to_main_database(env)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (INIT_LOCK_KEY,))
            if not cur.fetchone()[0]:
                log("another server instance is initialising the databases; waiting for it")
                cur.execute("SELECT pg_advisory_lock(%s)", (INIT_LOCK_KEY,))
        yield
    finally:
        conn.close()  # ends the session, and with it the lock


def prepare_schema(env: dict[str, str]) -> None:
    """Create the tracking schema in an empty database; refuse to serve one that is not at this
    MLflow's schema. MLflow's migrations are not transactional, so the server never runs them as a
    side effect of starting (MLflow itself would migrate the auth database silently): the upgrade
    procedure does, after a backup (mlstack.upgrade, mlstack.schema_state)."""
    from mlstack.schema_state import Standing, inspect

    uri = s.backend_store_uri(env)
    states = inspect(uri, s.backend_store_uri(env, s.MLFLOW_AUTH_DB.get(env)))
    behind = [st for st in states if st.standing is Standing.BEHIND]
    unknown = [st for st in states if st.standing is Standing.UNKNOWN]
    if unknown:
        raise SystemExit("mlflow server: refusing to start: " + "; ".join(st.describe() for st in unknown)
                         + ". Install the MLflow that wrote it, or restore a backup taken before that upgrade.")
    if behind:
        raise SystemExit(
            "mlflow server: refusing to start: " + "; ".join(st.describe() for st in behind)
            + ". Migrations are not transactional, so the server does not run them itself: run "
            "`make upgrade` (compose) or `make stack-upgrade` (native stack), which backs up both "
            "databases and the bucket, migrates, and starts this version (README, Upgrading MLflow)."
        )
    if states[0].standing is Standing.FRESH:
        # `mlflow db upgrade` expects an existing schema; creating the store builds it from scratch.
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        log("initialising the tracking schema")
        SqlAlchemyStore(uri, "mlflow-artifacts:/")


def load_s3_credentials(env: dict[str, str]) -> dict[str, str]:
    path = Path(s.S3_CREDENTIALS_FILE.get(env))
    if not path.is_file():
        raise SystemExit(f"{path} not found: the storage init job has not written the MLflow S3 key yet")
    data = json.loads(path.read_text())
    return {"AWS_ACCESS_KEY_ID": data["access_key"], "AWS_SECRET_ACCESS_KEY": data["secret_key"]}


AUTH_CACHE_TTL_SECONDS = 60


def write_auth_config(env: dict[str, str], runtime_dir: Path) -> Path:
    """The auth app reads its database URI from an ini file; keep it private (it holds a password)."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = runtime_dir / "basic_auth.ini"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            "[mlflow]\n"
            f"default_permission = {s.MLFLOW_DEFAULT_PERMISSION.get(env)}\n"
            f"database_uri = {s.backend_store_uri(env, s.MLFLOW_AUTH_DB.get(env))}\n"
            f"admin_username = {s.MLFLOW_ADMIN_USER.get(env)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without the cache every request re-checks the password hash (PBKDF2): ~0.3 s of CPU
            # per request on 2 cores, which capped metric logging and made each checkpoint file
            # cost a second of round trips (bench/). Cached per worker for a minute: a password
            # change or user deletion reaches the other workers within that minute.
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_SECONDS}\n"
        )
    return path


# Database connections each engine of a worker (tracking store, auth store) keeps open. MLflow's
# default (SQLAlchemy's 5, and 10 more made and closed per use) had the workers opening fresh
# PostgreSQL connections during the load of 8 clients logging metrics (psycopg2's connect showed in
# the server's CPU profile, bench/metrics_load.py). Kept: 10, and 5 more on demand, the same
# ceiling of 15 per engine as before, so max_connections is no nearer.
DB_POOL_SIZE, DB_POOL_OVERFLOW = 10, 5


def server_environment(env: dict[str, str], auth_config: Path) -> dict[str, str]:
    """What ``mlflow server`` would hand its workers, plus our choices (auth, no job runner)."""
    from mlflow.server import constants as c

    uri = s.backend_store_uri(env)
    out = dict(env)
    out.update(load_s3_credentials(env))
    out.update(
        {
            c.BACKEND_STORE_URI_ENV_VAR: uri,
            c.REGISTRY_STORE_URI_ENV_VAR: uri,
            c.ARTIFACT_ROOT_ENV_VAR: "mlflow-artifacts:/",
            c.SERVE_ARTIFACTS_ENV_VAR: "true",
            c.ARTIFACTS_DESTINATION_ENV_VAR: s.artifacts_destination(env),
            "MLFLOW_S3_ENDPOINT_URL": s.S3_ENDPOINT_URL.get(env),
            "_MLFLOW_SGI_NAME": "uvicorn",
            "_MLFLOW_SERVER_BOOT_ID": uuid.uuid4().hex,
            "_MLFLOW_IN_JOB_EXECUTOR": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": s.MLFLOW_ADMIN_USER.get(env),
            "MLFLOW_AUTH_ADMIN_PASSWORD": s.MLFLOW_ADMIN_PASSWORD.get(env),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s.MLFLOW_FLASK_SERVER_SECRET_KEY.get(env),
            "MLFLOW_SERVER_ALLOWED_HOSTS": s.MLFLOW_ALLOWED_HOSTS.get(env),
            "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": s.MLFLOW_CORS_ALLOWED_ORIGINS.get(env),
            # The job runner adds ~8 processes and ~1.8 GB for features this stack does not use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(DB_POOL_SIZE),
            "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(DB_POOL_OVERFLOW),
        }
    )
    return out


def gunicorn_command(env: dict[str, str], runtime_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "uvicorn.workers.UvicornWorker",
        "--workers", s.MLFLOW_WORKERS.get(env),
        "--bind", f"{s.MLFLOW_HOST.get(env)}:{s.MLFLOW_PORT.get(env)}",
        # gunicorn believes X-Forwarded-For from 127.0.0.1 by default: any local process could
        # then pick the address the login limiter counts (mlstack.login_limiter). Only named proxies.
        "--forwarded-allow-ips", s.MLFLOW_TRUSTED_PROXIES.get(env),
        # Large artifact uploads stream through the workers; don't kill a busy one mid-transfer.
        "--timeout", "600",
        "--graceful-timeout", "30",
        "--access-logfile", "-",
        # gunicorn's control socket defaults to ~/.gunicorn/, which the image's user cannot write
        # and which two servers of one user on a host would share: keep it in the private runtime dir.
        "--control-socket", str(runtime_dir / "gunicorn.ctl"),
        # MLflow's auth app with streaming artifact transfers (see mlstack.mlflow_app and mlstack.patches).
        "mlstack.mlflow_app:create_app()",
    ]


def bootstrap_admin(server_env: dict[str, str]) -> None:
    """Create the auth schema and the admin account once, before workers race to do it."""
    code = "from mlflow.server.auth import bootstrap_admin_user; bootstrap_admin_user()"
    subprocess.run([sys.executable, "-c", code], env=server_env, check=True)


def main() -> None:
    env = dict(os.environ)
    try:
        for var in s.SERVICE_VARS["mlflow"]:
            var.get(env)  # fail fast, naming the missing variable
        wait_for_database(env)
        runtime_dir = Path(tempfile.mkdtemp(prefix="mlstack-"))  # 0700, private to this server
        with initialisation_lock(env):
            ensure_database(env, s.MLFLOW_AUTH_DB.get(env))
            prepare_schema(env)
            server_env = server_environment(env, write_auth_config(env, runtime_dir))
            bootstrap_admin(server_env)
    except s.SettingsError as exc:
        raise SystemExit(f"mlflow server: {exc}") from None
    cmd = gunicorn_command(env, runtime_dir)
    log("starting " + " ".join(cmd))
    os.execve(sys.executable, cmd, server_env)


if __name__ == "__main__":
    main()
