"""Session fixtures: one real native stack (PostgreSQL, SeaweedFS, MLflow) on free loopback ports.

It is started through the same launcher `make stack` uses, in a temporary state directory, and
stopped at the end of the session, process trees included.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from mlstack.native.processes import free_port
from mlstack.native.stack import Stack

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RunningStack:
    stack: Stack
    env: dict[str, str]

    @property
    def uri(self) -> str:
        return self.env["MLFLOW_PUBLIC_URL"]

    @property
    def trainer_auth(self) -> tuple[str, str]:
        return self.env["MLFLOW_TRAINER_USER"], self.env["MLFLOW_TRAINER_PASSWORD"]

    @property
    def admin_auth(self) -> tuple[str, str]:
        return self.env["MLFLOW_ADMIN_USER"], self.env["MLFLOW_ADMIN_PASSWORD"]

    @property
    def bucket(self) -> str:
        return self.env["S3_BUCKET"]

    def client_env(self, user: str = "trainer") -> dict[str, str]:
        """A client's environment: tracking URI and user credentials, and no S3 variables at all."""
        name, password = self.trainer_auth if user == "trainer" else self.admin_auth
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "S3_"))}
        env.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password)
        return env

    def s3_root(self):
        """boto3 straight to the S3 server with the root key: how tests inspect the bucket."""
        return boto3.client(
            "s3", endpoint_url=self.env["S3_ENDPOINT_URL"], aws_access_key_id=self.env["S3_ROOT_USER"],
            aws_secret_access_key=self.env["S3_ROOT_PASSWORD"], region_name="us-east-1",
        )

    def bucket_keys(self, prefix: str = "") -> dict[str, int]:
        s3, keys = self.s3_root(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return keys


@pytest.fixture(scope="session")
def stack_ports() -> dict[str, str]:
    return {"STACK_DB_PORT": str(free_port()), "STACK_S3_PORT": str(free_port()), "STACK_MLFLOW_PORT": str(free_port())}


@pytest.fixture(scope="session")
def native_stack(stack_ports) -> RunningStack:
    # Not under pytest's tmp_path root: every pytest session re-chmods that root to 0700, which
    # would lock the unprivileged PostgreSQL account out of its data directory mid-run.
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-tests-"))
    saved = {k: os.environ.get(k) for k in stack_ports}
    os.environ.update(stack_ports)
    stack = Stack(state_dir)
    try:
        env = stack.up()
        yield RunningStack(stack, env)
    finally:
        Stack(state_dir).down()
        shutil.rmtree(state_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def mlflow_client_env(native_stack, monkeypatch):
    """Point this process's MLflow client at the stack as the trainer user, with no S3 variables."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "MLFLOW_", "S3_")) and key not in ("MLFLOW_TRACKING_URI",):
            monkeypatch.delenv(key, raising=False)
    for key, value in native_stack.client_env().items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    import mlflow

    mlflow.set_tracking_uri(native_stack.uri)
    yield native_stack
    mlflow.set_tracking_uri(None)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
