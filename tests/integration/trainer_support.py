"""Shared helpers for tests/integration/test_trainer*.py: run the mltrainer CLI, read the bucket.

The CLI always runs as a subprocess with only the tracking URI and the trainer's credentials in
its environment (no S3 variables), from the repository root, like a teammate's machine would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from running_stack import environ_set

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"
MANIFEST = "manifest.json"
RUN_LINE = re.compile(r"^Run (?P<name>.+) \((?P<run_id>[0-9a-f]{32})\) finished at step (?P<step>\d+)$", re.M)


def unique_experiment(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mltrainer.cli", *args]


def trainer_env(stack, **extra: str) -> dict[str, str]:
    env = stack.client_env()
    # Offline: the tiny model is local, and mlflow.transformers would otherwise try the Hub for a model card.
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    return env


def run_cli(stack, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=REPO, env=env or trainer_env(stack), capture_output=True,
                          text=True, timeout=timeout)


def train_args(output_root: Path, experiment: str, *overrides: str, config: str | Path = TINY) -> list[str]:
    # The final MLflow model costs seconds per run and only some tests look at it; they ask for it.
    wants_model = any(o.startswith("log_final_model=") for o in overrides)
    defaults = () if wants_model else ("log_final_model=false",)
    sets = [a for o in (f"output_root={output_root}", f"experiment.name={experiment}", *defaults, *overrides)
            for a in ("--set", o)]
    return ["--config", str(config), *sets]


def start_train(stack, output_root: Path, experiment: str, *overrides: str, config: str | Path = TINY,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a training in the background; its output goes to files in ``output_root``."""
    output_root.mkdir(parents=True, exist_ok=True)
    logs = (output_root / f"{experiment}-{uuid.uuid4().hex[:6]}.stdout.log",
            output_root / f"{experiment}-{uuid.uuid4().hex[:6]}.stderr.log")
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        proc = subprocess.Popen(cli_command(*train_args(output_root, experiment, *overrides, config=config)),
                                cwd=REPO, env=env or trainer_env(stack), stdout=out, stderr=err, text=True)
    proc.logs = logs
    return proc


def finish(proc: subprocess.Popen, timeout: float = 400) -> TrainedRun:
    """Wait for a training started with :func:`start_train`; assert it succeeded."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = (p.read_text() for p in proc.logs)
    assert proc.returncode == 0, f"mltrainer failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    match = RUN_LINE.search(stdout)
    assert match, f"no 'Run ... finished' line in the output:\n{stdout[-3000:]}"
    return TrainedRun(run_id=match["run_id"], name=match["name"], step=int(match["step"]), stdout=stdout,
                      stderr=stderr)


def train(stack, output_root: Path, experiment: str, *overrides: str, config: str | Path = TINY,
          timeout: float = 400) -> TrainedRun:
    """Run a training to completion (exit 0 asserted) and describe the run it created."""
    return finish(start_train(stack, output_root, experiment, *overrides, config=config), timeout)


@dataclass
class TrainedRun:
    run_id: str
    name: str
    step: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def trainer_client(stack):
    """An in-process MlflowClient as the trainer user; the environment is restored afterwards."""
    user, password = stack.trainer_auth
    with environ_set({"MLFLOW_TRACKING_URI": stack.uri, "MLFLOW_TRACKING_USERNAME": user,
                      "MLFLOW_TRACKING_PASSWORD": password}):
        yield MlflowClient(tracking_uri=stack.uri)


def artifact_prefix(client: MlflowClient, run_id: str) -> str:
    """Bucket prefix of a run's artifacts: artifacts/<experiment_id>/<run_id>/artifacts/."""
    run = client.get_run(run_id)
    assert run.info.artifact_uri == f"mlflow-artifacts:/{run.info.experiment_id}/{run_id}/artifacts", \
        run.info.artifact_uri
    return f"artifacts/{run.info.experiment_id}/{run_id}/artifacts/"


def read_object(stack, key: str) -> bytes:
    return stack.s3_root().get_object(Bucket=stack.bucket, Key=key)["Body"].read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_digests(stack, prefix: str) -> dict[str, str]:
    """sha256 of every object under ``prefix`` (read back from the bucket)."""
    return {key: sha256(read_object(stack, key)) for key in stack.bucket_keys(prefix)}


def stored_checkpoints(stack, prefix: str) -> dict[str, dict]:
    """Checkpoint folders that have a manifest (= stored checkpoints): store path -> parsed manifest."""
    out = {}
    for key in stack.bucket_keys(prefix + "checkpoints/"):
        if key.endswith("/" + MANIFEST):
            out[key[len(prefix):-len("/" + MANIFEST)]] = json.loads(read_object(stack, key))
    return out


def step_path(step: int) -> str:
    return f"checkpoints/step-{step:08d}"


def wait_for(check, *, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def kill_tree_of(proc: subprocess.Popen) -> None:
    """SIGKILL a trainer and its children, as a dead node would: nothing gets to clean up."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)


def wait_until_resumable(client: MlflowClient, run_id: str, timeout: float) -> None:
    """Wait for the lease of a killed trainer to run out (mltrainer/lease.py): only then may a resume take its run."""
    from mltrainer.lease import holder

    wait_for(lambda: holder(client.get_run(run_id).data.tags, time.time()) is None, timeout=timeout,
             what=f"the lease on run {run_id} to expire")


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def expected_best(eval_history: list[tuple[int, float]], saved_steps: set[int]) -> int:
    """The step that ranks best by eval_loss (min) among saved steps; ties go to the earlier step."""
    candidates = [(value, step) for step, value in eval_history if step in saved_steps]
    assert candidates, "no eval_loss at any saved step"
    return min(candidates)[1]
