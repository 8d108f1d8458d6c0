"""An older MLflow for the upgrade test: its own virtual environment, and its plain ``mlflow server``
with basic auth on the native stack's PostgreSQL and S3, the way a team ran it before upgrading.

Our server code (``mlstack.mlflow_app``) patches the internals of the MLflow we pin and is not
meant to run on another version, so the old stack's server is MLflow's own command, configured
like ours: proxied artifacts in the same bucket prefix, the same two databases, the same admin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import requests

from mlstack import settings as s
from mlstack.native.processes import Handle, spawn, wait_until

REPO = Path(__file__).resolve().parents[2]
# The release before our pin. For the next upgrade (pin 3.18.0), this becomes 3.17.2.
OLD_MLFLOW = "3.16.1"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlstack-upgrade-test"
# Besides mlflow[auth], what the stack's server needs of its own: pinned as ours are.
SERVER_EXTRAS = ("psycopg2-binary", "boto3")


class OldMlflowUnavailable(RuntimeError):
    """The older MLflow could not be installed; the message says why (no package index, ...)."""


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.split("[")[0].strip().lower()] = version.strip()
    return pins


def _constraints(path: Path) -> None:
    """Every other package at the version our environment has: the two stacks then differ in MLflow
    alone, and pip resolves in seconds."""
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    keep = [line for line in frozen if "==" in line
            and line.split("==")[0].lower().replace("_", "-") not in {"mlflow", "mlflow-skinny", "mlflow-tracing"}]
    path.write_text("\n".join(keep) + "\n")


def old_mlflow_python(version: str = OLD_MLFLOW) -> Path:
    """The interpreter of a virtual environment with ``mlflow[auth]==version``, made once and cached
    under ~/.cache/mlstack-upgrade-test/ (a minute or two the first time, from the package index)."""
    home = CACHE / f"mlflow-{version}"
    python = home / "bin" / "python"
    if (home / ".complete").exists():
        return python
    building = CACHE / f"mlflow-{version}.building-{os.getpid()}"
    venv.create(building, with_pip=True, clear=True)
    pins = _pins(REPO / "services" / "requirements.txt")
    constraints = building / "constraints.txt"
    _constraints(constraints)
    cmd = [str(building / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
           "--progress-bar", "off", "-c", str(constraints), f"mlflow[auth]=={version}",
           *(f"{name}=={pins[name]}" for name in SERVER_EXTRAS)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        output = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                           if not line.startswith("WARNING: Location"))
        raise OldMlflowUnavailable(
            f"could not install mlflow[auth]=={version} into {home} from the package index (exit "
            f"{result.returncode}); the upgrade test needs PyPI or a mirror. pip said:\n{output[-3000:]}")
    # Built under a name of its own, so an interrupted build is never taken for a finished one; its
    # scripts' shebangs keep that name, which is why only its interpreter is ever called.
    (building / ".complete").touch()
    if home.exists():
        shutil.rmtree(home)
    os.rename(building, home)
    return python


def start_old_server(python: Path, env: dict[str, str], state_dir: Path, port: int) -> Handle:
    """``mlflow server --app-name basic-auth`` of the old MLflow, on the stack's databases and bucket."""
    runtime = state_dir / "old-mlflow"
    runtime.mkdir(parents=True, exist_ok=True)
    auth_ini = runtime / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        f"default_permission = {s.MLFLOW_DEFAULT_PERMISSION.get(env)}\n"
        f"database_uri = {s.backend_store_uri(env, s.MLFLOW_AUTH_DB.get(env))}\n"
        f"admin_username = {s.MLFLOW_ADMIN_USER.get(env)}\n"
        f"admin_password = {s.MLFLOW_ADMIN_PASSWORD.get(env)}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    creds = json.loads(Path(s.S3_CREDENTIALS_FILE.get(env)).read_text())
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    server_env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
        MLFLOW_FLASK_SERVER_SECRET_KEY=s.MLFLOW_FLASK_SERVER_SECRET_KEY.get(env),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_S3_ENDPOINT_URL=s.S3_ENDPOINT_URL.get(env),
        AWS_ACCESS_KEY_ID=creds["access_key"], AWS_SECRET_ACCESS_KEY=creds["secret_key"],
    )
    cmd = [str(python), "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--backend-store-uri", s.backend_store_uri(env),
           "--artifacts-destination", f"s3://{s.S3_BUCKET.get(env)}/artifacts", "--serve-artifacts"]
    log = state_dir / "logs" / "old-mlflow.log"
    handle = spawn(cmd, env=server_env, log_path=log)

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(healthy, what=f"MLflow {OLD_MLFLOW} server", timeout=180, handle=handle, log_path=log)
    return handle


def run_client(python: Path, *args: str) -> dict:
    """Run tests/integration/upgrade_data.py with ``python``; its JSON answer."""
    script = Path(__file__).with_name("upgrade_data.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "S3_"))}
    result = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{python} {script.name} {args[0]} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])
