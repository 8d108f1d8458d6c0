"""The MLflow upgrade steps that run where the new MLflow is installed: ``check`` and ``migrate``.

``python -m mlstack.upgrade check``   refuses an upgrade that cannot work, before anything changes:
    a database written by a newer MLflow, or a server patch (``mlstack.patches``) that does not
    take hold on the installed MLflow. The patches are checked by building the server app the way
    gunicorn does, against throwaway stores in a temporary directory, so their start-up self-checks
    run without touching the real databases (opening the real auth database would migrate it).
``python -m mlstack.upgrade migrate`` runs ``mlflow db upgrade`` on the tracking database and
    MLflow's auth migrations on the auth database, each only when it is behind, and times them.
``python -m mlstack.upgrade prepare`` makes the databases ready for servers that start together
    (Kubernetes replicas): ``check`` when a database is behind, ``migrate``, then what a server
    does before it serves on an empty database (the auth database, both schemas, the admin
    account), done once so that no two servers create a schema at the same moment (MLflow fails
    when they do).

Both read the same environment variables as the server entrypoint (``mlstack.settings``). The
orchestration around them (stop the old server, back up, migrate, start the new one) is
``mlstack.native.upgrade`` for the native stack and ``make upgrade`` for compose. Nothing here
names an MLflow version: an upgrade is a change of the pin, then this procedure.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlstack import schema_state
from mlstack import settings as s
from mlstack.schema_state import SchemaState, Standing

# What the server runs to build its app (gunicorn's app spec in mlstack.mlflow_server).
APP_FACTORY = "mlstack.mlflow_app:create_app"
# How mlstack.patches.self_check warns of a patch the operator lets the server run without.
UNPATCHED_WARNING = "RUNNING WITHOUT PATCH"


class UpgradeRefused(RuntimeError):
    """The upgrade cannot go ahead; the message says why and what to do."""


def log(message: str) -> None:
    print(f"[upgrade] {message}", flush=True)


def installed_mlflow() -> str:
    from importlib.metadata import version

    return version("mlflow")


def database_uris(env: dict[str, str]) -> tuple[str, str]:
    return s.backend_store_uri(env), s.backend_store_uri(env, s.MLFLOW_AUTH_DB.get(env))


def refuse_unknown(states: tuple[SchemaState, ...]) -> None:
    unknown = [st for st in states if st.standing is Standing.UNKNOWN]
    if unknown:
        raise UpgradeRefused(
            "; ".join(st.describe() for st in unknown)
            + f". MLflow {installed_mlflow()} cannot serve or migrate it (there are no downgrades here): "
            "install the MLflow that wrote it, or restore a backup taken before that upgrade."
        )


def check_patches() -> tuple[float, list[str]]:
    """Build the server app in a fresh interpreter on throwaway stores; its patches check themselves
    as it is built, and a failing one raises, naming itself. Returns the seconds it took and the
    warnings of patches not in effect that the operator allows (MLSTACK_ALLOW_UNPATCHED)."""
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlstack-upgrade-check-") as tmp:
        root = Path(tmp)
        auth_ini = root / "basic_auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\n"
            "admin_username = upgrade-check\n"
            f"admin_password = {secrets.token_urlsafe(18)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        from mlflow.server import constants as c

        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW_", "AWS_"))}
        env.update({
            c.BACKEND_STORE_URI_ENV_VAR: f"sqlite:///{root / 'tracking.db'}",
            c.REGISTRY_STORE_URI_ENV_VAR: f"sqlite:///{root / 'tracking.db'}",
            c.ARTIFACT_ROOT_ENV_VAR: "mlflow-artifacts:/",
            c.SERVE_ARTIFACTS_ENV_VAR: "true",
            c.ARTIFACTS_DESTINATION_ENV_VAR: str(root / "artifacts"),
            "_MLFLOW_SGI_NAME": "uvicorn",
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(18),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
        module, factory = APP_FACTORY.split(":")
        code = f"from {module} import {factory}; {factory}()"
        result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise UpgradeRefused(
            f"the stack's server does not start on MLflow {installed_mlflow()}: building its app failed "
            f"(exit {result.returncode}). Nothing was changed. Its output ends:\n{_tail(result.stdout + result.stderr)}"
        )
    output = (result.stdout + result.stderr).splitlines()
    return time.monotonic() - began, [line for line in output if UNPATCHED_WARNING in line]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check(env: dict[str, str]) -> tuple[SchemaState, SchemaState]:
    """Everything that can refuse an upgrade, before anything is stopped, backed up or migrated."""
    log(f"installed MLflow {installed_mlflow()}")
    states = schema_state.inspect(*database_uris(env))
    for st in states:
        log(st.describe())
    refuse_unknown(states)
    seconds, unpatched = check_patches()
    if unpatched:
        # The operator allows these; the upgrade goes on, but not without saying so.
        for line in unpatched:
            log(f"WARNING: {line}")
        log(f"the other server patches take hold on this MLflow (app built in {seconds:.1f}s)")
    else:
        log(f"server patches take hold on this MLflow (app built in {seconds:.1f}s)")
    return states


def migrate(env: dict[str, str]) -> dict[str, float]:
    """Bring both databases to the installed MLflow's heads; returns seconds per migrated database.

    Run only with no server of the old version writing (the callers stop it first), and only after
    a backup: MLflow's migrations are not transactional.
    """
    tracking_uri, auth_uri = database_uris(env)
    states = schema_state.inspect(tracking_uri, auth_uri)
    refuse_unknown(states)
    commands = {
        "tracking": [sys.executable, "-m", "mlflow", "db", "upgrade", tracking_uri],
        "auth": [sys.executable, "-m", "mlflow.server.auth", "db", "upgrade", "--url", auth_uri],
    }
    timings: dict[str, float] = {}
    for st in states:
        if st.standing is not Standing.BEHIND:
            log(f"{st.database} database: nothing to migrate ({st.standing.value})")
            continue
        log(f"migrating the {st.database} database: {st.revision or 'unversioned'} -> {st.head}")
        began = time.monotonic()
        result = subprocess.run(commands[st.database], capture_output=True, text=True)
        if result.returncode != 0:
            # The URI holds the database password: the command is named, never printed.
            raise UpgradeRefused(
                f"the {st.database} database's migration failed (exit {result.returncode}); it may be "
                f"half-migrated: restore the backup taken before it. Output:\n{_tail(result.stdout + result.stderr)}"
            )
        timings[st.database] = time.monotonic() - began
        log(f"{st.database} database migrated in {timings[st.database]:.1f}s")
    for st in schema_state.inspect(tracking_uri, auth_uri):
        if st.standing not in (Standing.CURRENT, Standing.FRESH):
            raise UpgradeRefused(f"after the migration, {st.describe()}")
    return timings


def prepare(env: dict[str, str]) -> None:
    """Everything a server does to the databases before it serves, once, ahead of all servers.

    Each server still runs the same steps at its start (mlstack.mlflow_server), under the same
    PostgreSQL lock; after this they find the databases made and change nothing. Like
    ``migrate``, run it after a backup and with no server of an older MLflow writing (README,
    Kubernetes).
    """
    from mlstack import mlflow_server as server

    server.wait_for_database(env)
    # The servers' own lock: one started meanwhile (the Deployment applied early) waits for this.
    with server.initialisation_lock(env):
        server.ensure_database(env, s.MLFLOW_AUTH_DB.get(env))
        if any(st.standing is Standing.BEHIND for st in schema_state.inspect(*database_uris(env))):
            # An upgrade: as `make upgrade` does, refuse before migrating when the new server would not start.
            check(env)
        migrate(env)
        server.prepare_schema(env)  # creates the tracking schema when empty
        with tempfile.TemporaryDirectory(prefix="mlstack-prepare-") as tmp:
            # The auth schema and the admin account, the way the server makes them at its start.
            server.bootstrap_admin(server.server_environment(env, server.write_auth_config(env, Path(tmp))))
    for st in schema_state.inspect(*database_uris(env)):
        if st.standing is not Standing.CURRENT:
            raise UpgradeRefused(f"after preparing, {st.describe()}")
        log(st.describe())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlstack.upgrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("check", "migrate", "prepare"))
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        for var in s.SERVICE_VARS["mlflow"]:
            var.get(env)  # name a missing variable before connecting anywhere
        if args.step == "check":
            check(env)
        elif args.step == "migrate":
            migrate(env)
        else:
            prepare(env)
    except (UpgradeRefused, s.SettingsError) as exc:
        print(f"upgrade refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
