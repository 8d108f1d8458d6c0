"""Session fixtures: one real native stack (PostgreSQL, SeaweedFS, MLflow) on free loopback ports.

It is started through the same launcher `make stack` uses, in a temporary state directory, and
stopped at the end of the session, process trees included.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mlstack.native.stack import Stack
from running_stack import RunningStack, environ_set, free_stack_ports

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack_ports() -> dict[str, str]:
    return free_stack_ports()


@pytest.fixture(scope="session")
def native_stack(stack_ports) -> RunningStack:
    # Not under pytest's tmp_path root: every pytest session re-chmods that root to 0700, which
    # would lock the unprivileged PostgreSQL account out of its data directory mid-run.
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-tests-"))
    with environ_set(stack_ports):
        stack = Stack(state_dir)
        try:
            env = stack.up()
            yield RunningStack(stack, env)
        finally:
            Stack(state_dir).down()
            shutil.rmtree(state_dir, ignore_errors=True)


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
