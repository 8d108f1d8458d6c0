"""The environment variables every stack entrypoint reads, in one place.

Docker Compose and the native launcher both start the services through the entrypoints in this
package and hand them the variables named here, so the two ways of running the stack cannot
drift apart: a test compares the names compose passes with the names declared here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingsError(RuntimeError):
    """A required variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Var:
    name: str
    help: str
    default: str | None = None
    secret: bool = False
    choices: tuple[str, ...] = ()  # when set, the only values accepted

    def get(self, env: dict[str, str] | None = None) -> str:
        source = os.environ if env is None else env
        value = source.get(self.name, "")
        if value == "":
            if self.default is None:
                raise SettingsError(f"environment variable {self.name} is not set ({self.help})")
            return self.default
        if self.choices and value not in self.choices:
            raise SettingsError(f"environment variable {self.name}={value!r} is not one of {', '.join(self.choices)}")
        return value

    def get_int(self, env: dict[str, str] | None = None) -> int:
        raw = self.get(env)
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"environment variable {self.name}={raw!r} is not an integer") from None


# PostgreSQL: the names the official postgres image reads, so compose passes them through as-is.
POSTGRES_USER = Var("POSTGRES_USER", "database user owning the MLflow schema", "mlflow")
POSTGRES_PASSWORD = Var("POSTGRES_PASSWORD", "password of POSTGRES_USER", secret=True)
POSTGRES_DB = Var("POSTGRES_DB", "database holding runs, metrics and the model registry", "mlflow")
MLFLOW_AUTH_DB = Var("MLFLOW_AUTH_DB", "database holding MLflow users and permissions", "mlflow_auth")
DB_HOST = Var("DB_HOST", "host of the PostgreSQL server as the MLflow server sees it", "postgres")
DB_PORT = Var("DB_PORT", "port of the PostgreSQL server", "5432")

# S3 artifact store.
S3_BACKEND = Var("S3_BACKEND", "which S3 server the init job configures: minio or seaweedfs", "minio")
S3_ENDPOINT_URL = Var("S3_ENDPOINT_URL", "S3 endpoint as the MLflow server and init job see it", "http://s3:9000")
S3_PUBLIC_ENDPOINT_URL = Var(
    "S3_PUBLIC_ENDPOINT_URL",
    "S3 endpoint as trainers reach it; set, large files move to and from S3 directly on URLs the "
    "server presigns; empty or 'off', every byte goes through the MLflow server",
    "",
)
S3_BUCKET = Var("S3_BUCKET", "bucket holding every artifact", "mlflow")
S3_ROOT_USER = Var("S3_ROOT_USER", "root access key of the S3 server (store and init job only)", "stackroot")
S3_ROOT_PASSWORD = Var("S3_ROOT_PASSWORD", "root secret key of the S3 server", secret=True)
S3_CREDENTIALS_FILE = Var(
    "S3_CREDENTIALS_FILE",
    "file where the init job writes the bucket-scoped key the MLflow server uses",
    "/run/stack-credentials/mlflow-s3.json",
)

# MLflow server.
MLFLOW_HOST = Var("MLFLOW_HOST", "address the MLflow server listens on", "0.0.0.0")
MLFLOW_PORT = Var("MLFLOW_PORT", "port the MLflow server listens on", "5000")
MLFLOW_WORKERS = Var("MLFLOW_WORKERS", "gunicorn worker processes", "2")
MLFLOW_ALLOWED_HOSTS = Var(
    "MLFLOW_ALLOWED_HOSTS",
    "Host headers the server answers (comma-separated, fnmatch patterns); others are refused",
    "localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*",
)
MLFLOW_CORS_ALLOWED_ORIGINS = Var(
    "MLFLOW_CORS_ALLOWED_ORIGINS", "browser origins allowed to call the API cross-origin", "http://localhost:5000"
)
MLFLOW_ADMIN_USER = Var("MLFLOW_ADMIN_USER", "MLflow admin account, created on first start", "admin")
MLFLOW_ADMIN_PASSWORD = Var("MLFLOW_ADMIN_PASSWORD", "password of the MLflow admin account", secret=True)
MLFLOW_FLASK_SERVER_SECRET_KEY = Var(
    "MLFLOW_FLASK_SERVER_SECRET_KEY", "secret signing MLflow's CSRF tokens (same for every worker)", secret=True
)
# What every account may do with experiments and models it was not given a permission on. READ:
# a teammate sees everyone's runs but edits and deletes only in experiments they created (MLflow
# gives the creator MANAGE) or were granted EDIT/MANAGE on. EDIT would let anyone log into anyone's
# runs; MANAGE, delete them; NO_PERMISSIONS hides each person's work from the others.
MLFLOW_DEFAULT_PERMISSION = Var(
    "MLFLOW_DEFAULT_PERMISSION",
    "permission every user has on what they were not granted anything on",
    "READ",
    choices=("READ", "EDIT", "MANAGE", "NO_PERMISSIONS"),
)
MLFLOW_TRUSTED_PROXIES = Var(
    "MLFLOW_TRUSTED_PROXIES",
    "addresses of reverse proxies whose X-Forwarded-For the server believes (comma-separated); "
    "empty: none, so no client can claim another address to the login limiter",
    "",
)
# Patches of MLflow's internals (mlstack.patches) each check at server start that they took hold;
# one that did not stops the server, unless named here. Running without one brings back what it
# fixes (mlstack.patches.self_check), so this is for an operator who has read why.
MLSTACK_ALLOW_UNPATCHED = Var(
    "MLSTACK_ALLOW_UNPATCHED",
    "patches of MLflow (comma-separated names) the server may run without when they do not take hold",
    "",
)
MLFLOW_TRAINER_USER = Var("MLFLOW_TRAINER_USER", "non-admin account trainers log with", "trainer")
MLFLOW_TRAINER_PASSWORD = Var("MLFLOW_TRAINER_PASSWORD", "password of the trainer account", secret=True)
MLFLOW_PUBLIC_URL = Var(
    "MLFLOW_PUBLIC_URL", "tracking URI teammates use (printed by the launchers)", "http://localhost:5000"
)
MLFLOW_INTERNAL_URL = Var(
    "MLFLOW_INTERNAL_URL", "the server as other stack services reach it (defaults to MLFLOW_PUBLIC_URL)", ""
)

# Several server instances behind a load balancer that terminates TLS (mlstack.balancer).
STACK_SERVERS = Var(
    "STACK_SERVERS",
    "MLflow server instances (each its own gunicorn and workers) sharing the database and bucket; "
    "2 or more put HAProxy with TLS in front of them (native stack; compose: infra/compose.lb.yml)",
    "1",
)
STACK_TLS = Var(
    "STACK_TLS", "native stack: on puts HAProxy with TLS in front even of one server instance", "off",
    choices=("on", "off"),
)
TLS_CERT_FILE = Var(
    "TLS_CERT_FILE",
    "PEM certificate (with its chain) the load balancer presents; empty: a self-signed one made on "
    "first start and kept",
    "",
)
TLS_KEY_FILE = Var("TLS_KEY_FILE", "PEM private key of TLS_CERT_FILE", "")

ALL_VARS: tuple[Var, ...] = tuple(v for v in globals().values() if isinstance(v, Var))
SECRET_VARS: tuple[Var, ...] = tuple(v for v in ALL_VARS if v.secret)


# Where the MLflow server keeps proxied artifacts: ``mlflow-artifacts:/<path>`` is the object
# ``<ARTIFACTS_KEY_PREFIX>/<path>`` of the bucket (the server's and gc's one reading of the URI).
ARTIFACTS_KEY_PREFIX = "artifacts"


def artifacts_destination(env: dict[str, str] | None = None) -> str:
    """The S3 URI behind ``mlflow-artifacts:/`` (the server's ``--artifacts-destination``)."""
    return f"s3://{S3_BUCKET.get(env)}/{ARTIFACTS_KEY_PREFIX}"


def backend_store_uri(env: dict[str, str] | None = None, database: str | None = None) -> str:
    """SQLAlchemy URI of a stack database.

    The driver is spelled out: SQLAlchemy 2.1 maps bare ``postgresql://`` to psycopg 3, and the
    stack ships psycopg2.
    """
    from urllib.parse import quote

    user = quote(POSTGRES_USER.get(env), safe="")
    password = quote(POSTGRES_PASSWORD.get(env), safe="")
    db = database or POSTGRES_DB.get(env)
    return f"postgresql+psycopg2://{user}:{password}@{DB_HOST.get(env)}:{DB_PORT.get(env)}/{db}"


# What each entrypoint reads. Compose hands each service exactly these names and so does the
# native launcher (a test holds both to this table); the MLflow server never sees the S3 root key.
SERVICE_VARS: dict[str, tuple[Var, ...]] = {
    "mlflow": (
        POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, MLFLOW_AUTH_DB, DB_HOST, DB_PORT,
        S3_ENDPOINT_URL, S3_PUBLIC_ENDPOINT_URL, S3_BUCKET, S3_CREDENTIALS_FILE,
        MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_ALLOWED_HOSTS, MLFLOW_CORS_ALLOWED_ORIGINS,
        MLFLOW_ADMIN_USER, MLFLOW_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY,
        MLFLOW_DEFAULT_PERMISSION, MLFLOW_TRUSTED_PROXIES, MLSTACK_ALLOW_UNPATCHED,
    ),
    "storage-init": (S3_BACKEND, S3_ENDPOINT_URL, S3_BUCKET, S3_ROOT_USER, S3_ROOT_PASSWORD, S3_CREDENTIALS_FILE),
    # Writes the load balancer's configuration and certificate (compose: infra/compose.lb.yml).
    "lb-init": (STACK_SERVERS, TLS_CERT_FILE, TLS_KEY_FILE, MLFLOW_PUBLIC_URL),
    "users-init": (
        MLFLOW_PUBLIC_URL, MLFLOW_INTERNAL_URL, MLFLOW_ADMIN_USER, MLFLOW_ADMIN_PASSWORD,
        MLFLOW_TRAINER_USER, MLFLOW_TRAINER_PASSWORD,
    ),
}

# The module each service runs: `python -m <module>` in the compose image and natively.
SERVICE_MODULES: dict[str, str] = {
    "mlflow": "mlstack.mlflow_server",
    "storage-init": "mlstack.storage_init",
    "users-init": "mlstack.users_init",
}


def service_environment(service: str, values: dict[str, str], base: dict[str, str]) -> dict[str, str]:
    """``base`` (PATH, HOME, ...) plus exactly the stack variables ``service`` reads."""
    stack_names = {v.name for v in ALL_VARS}
    env = {k: v for k, v in base.items() if k not in stack_names}
    env.update({v.name: values[v.name] for v in SERVICE_VARS[service] if v.name in values})
    return env
