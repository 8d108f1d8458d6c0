"""`make train` honours the tracking variables the user exported (issue 12, item 4).

The real Makefile recipe runs, with `-o` so make never rebuilds the virtual environment, and an
empty STACK_STATE_DIR: had the recipe fallen back to a native stack, it would have started one
there (or failed on the test stack's ports), and the run would not be on the test stack.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import requests

from trainer_support import REPO

STAMP = ".venv/.installed"


def make_train(native_stack, state_dir: Path, output_root: Path, experiment: str, **exported: str):
    env = {k: v for k, v in native_stack.client_env().items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **exported)
    overrides = (f"output_root={output_root}", f"experiment.name={experiment}", "log_final_model=false",
                 "training.max_steps=4", "training.save_steps=4", "training.eval_steps=4")
    args = " ".join(f"--set {o}" for o in overrides)
    return subprocess.run(["make", "--no-print-directory", "-o", STAMP, "train", "CONFIG=configs/tiny.yaml",
                           f"ARGS={args}", f"STACK_STATE_DIR={state_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_an_exported_wrong_password_fails_with_exit_3_naming_the_server(native_stack, tmp_path):
    state_dir = tmp_path / "no-stack"
    proc = make_train(native_stack, state_dir, tmp_path / "out", f"wrongpw-{uuid.uuid4().hex[:6]}",
                      MLFLOW_TRACKING_URI=native_stack.uri, MLFLOW_TRACKING_USERNAME="trainer",
                      MLFLOW_TRACKING_PASSWORD="not-the-password")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train] Error 3" in out  # mltrainer's exit status for the server and credentials
    assert f"the MLflow server at {native_stack.uri} rejected the credentials" in out
    assert f"tracking server {native_stack.uri}, user trainer" in out
    assert not state_dir.exists()  # no native stack was started or consulted


def test_an_exported_teammate_server_and_account_are_where_the_run_goes(native_stack, tmp_path):
    name, password = f"teammate-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    created = requests.post(f"{native_stack.uri}/api/2.0/mlflow/users/create",
                            json={"username": name, "password": password}, auth=native_stack.admin_auth, timeout=30)
    assert created.status_code == 200, created.text
    experiment = f"teammate-{uuid.uuid4().hex[:6]}"
    state_dir = tmp_path / "no-stack"
    proc = make_train(native_stack, state_dir, tmp_path / "out", experiment, MLFLOW_TRACKING_URI=native_stack.uri,
                      MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"tracking server {native_stack.uri}, user {name}" in proc.stdout + proc.stderr
    assert not state_dir.exists()
    admin = native_stack.admin_auth
    exp = requests.get(f"{native_stack.uri}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": experiment}, auth=admin, timeout=30)
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment"]["experiment_id"]
    runs = requests.post(f"{native_stack.uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp_id]},
                         auth=admin, timeout=30).json()["runs"]
    assert [r["info"]["status"] for r in runs] == ["FINISHED"]
    # The experiment is the teammate's: MLflow gave its creator MANAGE on it.
    perm = requests.get(f"{native_stack.uri}/api/3.0/mlflow/users/permissions/get",
                        params={"username": name, "resource_type": "experiment", "resource_id": exp_id},
                        auth=admin, timeout=30)
    assert perm.status_code == 200 and perm.json()["permission"] == "MANAGE", perm.text
