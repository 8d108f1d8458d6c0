"""A port already taken stops `mlstack up` before anything starts, and the message names the
STACK_*_PORT variable to set; a start that fails later stops what that `up` started.

Real launcher, real PostgreSQL; the stack of the test session (conftest) is not touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import psutil
import pytest

from mlstack import settings as s
from mlstack.native import cli
from mlstack.native.processes import free_port, port_open
from mlstack.native.stack import SERVICES, Stack, StackError


@pytest.fixture
def state_dir():
    # Not under pytest's tmp_path: PostgreSQL's unprivileged account must reach it (see conftest).
    path = Path(tempfile.mkdtemp(prefix="mlstack-ports-"))
    yield path
    Stack(path).down()  # in case a test failed with something still running
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def own_ports(monkeypatch) -> dict[str, int]:
    for var in s.ALL_VARS:
        monkeypatch.delenv(var.name, raising=False)
    ports = {"STACK_DB_PORT": free_port(), "STACK_S3_PORT": free_port(), "STACK_MLFLOW_PORT": free_port()}
    for name, port in ports.items():
        monkeypatch.setenv(name, str(port))
    return ports


def listening_on(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def stack_pids_alive(state_dir: Path) -> list[str]:
    stack = Stack(state_dir)
    return [service for service in SERVICES if stack.handle(service) and stack.handle(service).alive()]


def test_taken_mlflow_port_names_its_variable_and_starts_nothing(state_dir, own_ports, capsys):
    with listening_on(own_ports["STACK_MLFLOW_PORT"]):
        code = cli.main(["--state-dir", str(state_dir), "up"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"port {own_ports['STACK_MLFLOW_PORT']}" in err and "set STACK_MLFLOW_PORT" in err
    assert "MLFLOW_PORT" not in err.replace("STACK_MLFLOW_PORT", "")  # not the compose variable
    # Checked before anything started: no PostgreSQL, no S3 server, nothing listening on their ports.
    assert stack_pids_alive(state_dir) == []
    assert not (state_dir / "postgres").exists()
    assert not port_open(own_ports["STACK_DB_PORT"]) and not port_open(own_ports["STACK_S3_PORT"])


def test_every_taken_port_is_named_at_once(state_dir, own_ports):
    with listening_on(own_ports["STACK_DB_PORT"]), listening_on(own_ports["STACK_S3_PORT"]):
        with pytest.raises(StackError) as err:
            Stack(state_dir).up()
    assert "set STACK_DB_PORT" in str(err.value) and "set STACK_S3_PORT" in str(err.value)
    assert "STACK_MLFLOW_PORT" not in str(err.value)
    assert stack_pids_alive(state_dir) == []


def test_failed_start_stops_what_it_started(state_dir, own_ports, monkeypatch):
    # A real failure after PostgreSQL is up: the MinIO backend asked for, with no `minio` binary.
    monkeypatch.setenv("S3_BACKEND", "minio")
    path = os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in path.split(os.pathsep) if not Path(d, "minio").exists()))
    stack = Stack(state_dir)
    with pytest.raises(RuntimeError, match="no 'minio' binary"):
        stack.up()
    postgres = Stack(state_dir).state.get("pids", {})
    assert postgres == {}, "the failed up left a pid recorded"
    assert (state_dir / "postgres").exists(), "PostgreSQL was started (initialised) before the failure"
    assert not port_open(own_ports["STACK_DB_PORT"]), "PostgreSQL still listens after the failed up"
    # Nothing of the stack runs: no process has the state directory on its command line.
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(state_dir) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
