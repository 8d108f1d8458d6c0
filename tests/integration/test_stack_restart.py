"""Stopping the native stack leaves no process behind, and starting it again keeps every run.

This test takes the session's stack down and brings it back up on the same state directory and
ports; whatever happens, it leaves the stack running for the tests after it.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid

import mlflow
import psutil
import requests
from mlflow import MlflowClient

from mlstack import settings as s
from mlstack.native import cli
from mlstack.native.processes import port_open
from mlstack.native.stack import SERVICES

PARAMS = {"optimizer": "adamw", "epochs": "3"}
STEPS = [(0, 3.0), (1, 2.25), (2, 1.5), (5, 0.75)]


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stack_processes(stack) -> list[psutil.Process]:
    """Every process of the stack: each service's root and all its descendants."""
    procs = []
    for service in SERVICES:
        handle = stack.handle(service)
        root = handle.process() if handle else None
        assert root is not None, f"{service} is not running before the restart"
        procs += [root, *root.children(recursive=True)]
    return procs


def still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running checks pid reuse
    except psutil.NoSuchProcess:
        return False


def log_run(tmp_path) -> dict:
    exp_name = f"restart-{uuid.uuid4().hex[:8]}"
    exp_id = mlflow.set_experiment(exp_name).experiment_id
    payload = tmp_path / "upload" / "blob.bin"
    payload.parent.mkdir()
    payload.write_bytes(os.urandom(5 << 20))
    with mlflow.start_run() as run:
        mlflow.log_params(PARAMS)
        for step, value in STEPS:
            mlflow.log_metric("loss", value, step=step)
        mlflow.log_artifact(str(payload), artifact_path="data")
    return {"exp_name": exp_name, "exp_id": exp_id, "run_id": run.info.run_id, "sha": sha256_file(payload),
            "size": payload.stat().st_size}


def assert_run_intact(native_stack, logged: dict, dst) -> None:
    client = MlflowClient(tracking_uri=native_stack.uri)
    exp = client.get_experiment_by_name(logged["exp_name"])
    assert exp is not None and exp.experiment_id == logged["exp_id"]
    run = client.get_run(logged["run_id"])
    assert run.info.experiment_id == logged["exp_id"] and run.info.status == "FINISHED"
    assert run.data.params == PARAMS
    history = sorted((m.step, m.value) for m in client.get_metric_history(logged["run_id"], "loss"))
    assert history == STEPS
    local = mlflow.artifacts.download_artifacts(run_id=logged["run_id"], artifact_path="data/blob.bin",
                                                dst_path=str(dst))
    assert os.path.getsize(local) == logged["size"]
    assert sha256_file(local) == logged["sha"]
    key = f"artifacts/{logged['exp_id']}/{logged['run_id']}/artifacts/data/blob.bin"
    assert native_stack.bucket_keys(key) == {key: logged["size"]}


def test_restart_keeps_data_and_leaves_no_process(mlflow_client_env, tmp_path, capsys):
    native_stack = mlflow_client_env
    stack = native_stack.stack
    logged = log_run(tmp_path)
    assert_run_intact(native_stack, logged, tmp_path / "before")

    ports = dict(stack.state["ports"])
    stack_values = {v.name: native_stack.env[v.name] for v in s.ALL_VARS}
    procs = stack_processes(stack)
    names = {p.pid: " ".join(p.cmdline()[:3]) for p in procs}
    # gunicorn master + workers, postgres + its background processes, weed: all in the list.
    assert len(procs) >= 3 + int(native_stack.env["MLFLOW_WORKERS"]) + 1

    try:
        # Through `mlstack down` (what `make stack-down` runs): it says what it stops, and how long each took.
        code = cli.main(["--state-dir", str(stack.state_dir), "down"])
        said = capsys.readouterr().out
        leftovers = [f"{p.pid} {names[p.pid]}" for p in procs if still_running(p)]
        open_ports = [name for name, port in ports.items() if port_open(port)]
        status = stack.status()
    finally:
        # Whatever went wrong above, the rest of the session needs a running stack.
        env = stack.up()
        native_stack.env = env

    assert code == 0
    assert re.findall(r"^stopping (\w+) \.\.\. stopped in \d+\.\ds$", said, re.M) == list(reversed(SERVICES)), said
    assert re.search(r"^stopped mlflow, s3, postgres in \d+\.\ds$", said, re.M), said
    assert leftovers == [], f"processes outlived `down`: {leftovers}"
    assert open_ports == [], f"ports still answering after `down`: {open_ports}"
    assert all(not info["running"] for info in status.values()), status

    # Same state dir: same ports, secrets and passwords; new processes.
    assert stack.state["ports"] == ports
    assert {v.name: env[v.name] for v in s.ALL_VARS} == stack_values
    old = {(p.pid, p.create_time()) for p in procs}
    new = [stack.handle(service) for service in SERVICES]
    assert all(h is not None and h.alive() and (h.pid, h.create_time) not in old for h in new)
    assert requests.get(f"{native_stack.uri}/health", timeout=10).status_code == 200

    assert_run_intact(native_stack, logged, tmp_path / "after")
    # And the restarted stack takes new runs.
    (tmp_path / "again").mkdir()
    assert_run_intact(native_stack, log_run(tmp_path / "again"), tmp_path / "again-dl")
