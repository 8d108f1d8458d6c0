"""Who may do what: the default permission setting, and whose tracking variables a client gets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlstack import settings as s
from mlstack.mlflow_server import write_auth_config
from mlstack.native.cli import client_exports


@pytest.mark.parametrize("value", ["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"])
def test_default_permission_reaches_the_auth_config(tmp_path, value):
    env = {"POSTGRES_PASSWORD": "pw", "MLFLOW_DEFAULT_PERMISSION": value}
    assert f"default_permission = {value}\n" in write_auth_config(env, tmp_path).read_text()


def test_default_permission_is_read_when_unset(tmp_path):
    assert "default_permission = READ\n" in write_auth_config({"POSTGRES_PASSWORD": "pw"}, tmp_path).read_text()


def test_a_default_permission_mlflow_does_not_know_stops_the_server_naming_it():
    env = {"PATH": "", **{v.name: "x" for v in s.SERVICE_VARS["mlflow"]}, "MLFLOW_DEFAULT_PERMISSION": "WRITE"}
    proc = subprocess.run([sys.executable, "-m", "mlstack.mlflow_server"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "MLFLOW_DEFAULT_PERMISSION='WRITE' is not one of READ, EDIT, MANAGE, NO_PERMISSIONS" in proc.stderr


STACK = {"MLFLOW_PUBLIC_URL": "http://127.0.0.1:5000", "MLFLOW_TRAINER_USER": "trainer",
         "MLFLOW_TRAINER_PASSWORD": "native pw"}


def test_client_exports_point_at_the_native_stack():
    assert client_exports(STACK) == ["export MLFLOW_TRACKING_URI=http://127.0.0.1:5000",
                                     "export MLFLOW_TRACKING_USERNAME=trainer",
                                     "export MLFLOW_TRACKING_PASSWORD='native pw'"]


def test_what_the_user_exported_wins():
    mine = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wrong", "MLFLOW_TRACKING_URI": ""}
    assert client_exports(STACK, keep=mine) == ["export MLFLOW_TRACKING_URI=http://127.0.0.1:5000"]
