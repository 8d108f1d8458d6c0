"""Resume from the store on a fresh machine, into the same MLflow run (real stack, tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from mltrainer.lease import LEASE_TAG
from trainer_support import wait_until_resumable

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
BASE_ARGS = [
    "--set", "log_final_model=false",
    "--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=4", "--set", "training.eval_steps=4",
    "--set", "training.logging_steps=2", "--set", "checkpoints.save_last_k=3",
    # A killed trainer's run is resumable once its lease runs out (mltrainer/lease.py): keep it short.
    "--set", "tracking.lease_seconds=6",
]


def cli(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mltrainer.cli", "--config", "configs/tiny.yaml", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run_cli(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mltrainer.cli", "--config", "configs/tiny.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def client_for(stack) -> MlflowClient:
    os.environ.update({k: v for k, v in stack.client_env().items() if k.startswith("MLFLOW_TRACKING_")})
    return MlflowClient(stack.uri)


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def checkpoint_prefix(stack, client, run_id: str) -> str:
    run = client.get_run(run_id)
    return f"artifacts/{run.info.experiment_id}/{run_id}/artifacts/checkpoints/"


def manifests_in_bucket(stack, prefix: str) -> set[int]:
    return {int(k.split("/step-")[1].split("/")[0]) for k in stack.bucket_keys(prefix) if k.endswith("/manifest.json")}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_id_from_output(text_source: Path) -> str:
    for line in text_source.read_text().splitlines():
        if " trains in " in line and "run " in line:
            return line.split("run ", 1)[1].split()[0]
    raise AssertionError("no run id in trainer output")


def start_logged(args, env, log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "mltrainer.cli", "--config", "configs/tiny.yaml", *args],
                            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def baseline(native_stack, tmp_path_factory):
    """The same training, uninterrupted."""
    out = tmp_path_factory.mktemp("baseline")
    env = native_stack.client_env()
    done = run_cli([*BASE_ARGS, "--set", f"output_root={out}", "--set", "experiment.name=resume-baseline"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = client_for(native_stack)
    (run,) = runs_of(client, "resume-baseline")
    return {"loss": history(client, run.info.run_id, "loss"), "eval_loss": history(client, run.info.run_id, "eval_loss")}


def kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def crash(client: MlflowClient, run_id: str) -> None:
    """As if the run's trainer died after its last checkpoint: a FINISHED run is never resumed."""
    client.set_terminated(run_id, "FAILED")


# A fresh machine (empty output directory, nothing but the config and the run id), or the killed
# trainer's own (its local checkpoints, half-written saves and upload snapshots still there, as in a
# compose volume shared by the trainer's containers).
@pytest.mark.parametrize("resume_on", ["machine-b", "machine-a"])
def test_sigkill_mid_training_then_resume_matches_uninterrupted(native_stack, baseline, tmp_path, resume_on):
    experiment = f"resume-kill-{resume_on}"
    env = native_stack.client_env()
    client = client_for(native_stack)
    log = tmp_path / "first.log"
    first = start_logged([*BASE_ARGS, "--set", f"output_root={tmp_path / 'machine-a'}",
                          "--set", f"experiment.name={experiment}"], env, log)
    try:
        wait_for(lambda: " trains in " in log.read_text(), 180, "the run to start", first)
        run_id = run_id_from_output(log)
        prefix = checkpoint_prefix(native_stack, client, run_id)
        wait_for(lambda: 12 in manifests_in_bucket(native_stack, prefix), 240, "checkpoint 12 in the store", first)
    finally:
        kill_tree(first)
    assert first.returncode == -signal.SIGKILL
    stored_before = manifests_in_bucket(native_stack, prefix)
    assert max(stored_before) < STEPS
    wait_until_resumable(client, run_id, timeout=60)  # a killed trainer holds its run until then

    done = run_cli([*BASE_ARGS, "--set", f"output_root={tmp_path / resume_on}", "--set",
                    f"experiment.name={experiment}", "--resume", run_id], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"finished at step {STEPS}" in done.stdout

    runs = runs_of(client, experiment)
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    loss = history(client, run_id, "loss")
    assert [s for s, _ in loss] == list(range(2, STEPS + 1, 2))  # each step exactly once, none missing
    assert [s for s, _ in history(client, run_id, "eval_loss")] == list(range(4, STEPS + 1, 4))
    assert loss[-1][1] == pytest.approx(baseline["loss"][-1][1], abs=1e-4)
    assert history(client, run_id, "eval_loss")[-1][1] == pytest.approx(baseline["eval_loss"][-1][1], abs=1e-4)
    # Retention kept working across the resume: last 3 + best 1, never the one resumed from.
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint.latest"] == f"checkpoints/step-{STEPS:08d}"
    final = manifests_in_bucket(native_stack, prefix)
    assert {STEPS - 8, STEPS - 4, STEPS} <= final
    assert len(final) <= 5


def test_kill_during_upload_leaves_incomplete_checkpoint_that_resume_skips(native_stack, tmp_path):
    """SIGSTOP the S3 server so an upload hangs, SIGKILL the trainer mid-upload, resume elsewhere."""
    env = native_stack.client_env()
    client = client_for(native_stack)
    weed = psutil.Process(native_stack.stack.handle("s3").pid)
    log = tmp_path / "first.log"
    out_a = tmp_path / "machine-a"
    first = start_logged([*BASE_ARGS, "--set", f"output_root={out_a}", "--set", "experiment.name=resume-upload",
                          "--set", "upload.max_retries=50"], env, log)
    try:
        wait_for(lambda: " trains in " in log.read_text(), 180, "the run to start", first)
        run_id = run_id_from_output(log)
        prefix = checkpoint_prefix(native_stack, client, run_id)
        wait_for(lambda: 4 in manifests_in_bucket(native_stack, prefix), 240, "checkpoint 4 in the store", first)
        weed.suspend()
        try:
            wait_for(lambda: any(out_a.glob("*/checkpoint-8")), 120, "the local save of step 8", first)
            time.sleep(1.0)  # the upload of step 8 is now in flight against a frozen server
            kill_tree(first)
        finally:
            weed.resume()
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert 8 not in manifests_in_bucket(native_stack, prefix)
    wait_until_resumable(client, run_id, timeout=60)  # a killed trainer holds its run until then

    done = run_cli([*BASE_ARGS, "--set", f"output_root={tmp_path / 'machine-b'}", "--set",
                    "experiment.name=resume-upload", "--resume", run_id, "--set", "training.max_steps=12"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Downloading checkpoints/step-00000004" in done.stdout + done.stderr
    # Training went on while the store was frozen, so steps past 8 may already be logged: each
    # step must still appear exactly once, with no gap.
    steps = [s for s, _ in history(client, run_id, "loss")]
    assert steps == list(range(2, max(steps) + 1, 2)) and max(steps) >= 12


def _corrupt_newest(native_stack, client, run_id) -> int:
    prefix = checkpoint_prefix(native_stack, client, run_id)
    newest = max(manifests_in_bucket(native_stack, prefix))
    s3 = native_stack.s3_root()
    manifest_key = f"{prefix}step-{newest:08d}/manifest.json"
    manifest = json.loads(s3.get_object(Bucket=native_stack.bucket, Key=manifest_key)["Body"].read())
    victim = next(f for f in manifest["files"] if f["path"] == "model.safetensors")
    key = f"{prefix.rsplit('checkpoints/', 1)[0]}{victim['stored_at']}"
    body = bytearray(s3.get_object(Bucket=native_stack.bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # same size, different bytes
    s3.put_object(Bucket=native_stack.bucket, Key=key, Body=bytes(body))
    return newest


@pytest.fixture(scope="module")
def finished_run(native_stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    done = run_cli([*BASE_ARGS, "--set", "training.max_steps=12", "--set", f"output_root={out}",
                    "--set", "experiment.name=resume-choices", "--set", "checkpoints.save_last_k=null",
                    "--set", "checkpoints.save_top_k=null", "--set", "checkpoints.monitor=null"],
                   native_stack.client_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = client_for(native_stack)
    (run,) = runs_of(client, "resume-choices")
    return run.info.run_id


def test_resume_from_specific_step_and_latest(native_stack, finished_run, tmp_path):
    env = native_stack.client_env()
    client = client_for(native_stack)
    common = ["--set", "training.max_steps=12", "--set", "experiment.name=resume-choices",
              "--set", "checkpoints.save_last_k=null", "--set", "checkpoints.save_top_k=null",
              "--set", "checkpoints.monitor=null"]
    crash(client, finished_run)
    done = run_cli([*BASE_ARGS, *common, "--set", f"output_root={tmp_path / 'a'}", "--resume", finished_run,
                    "--resume-checkpoint", "4"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Downloading checkpoints/step-00000004" in done.stdout + done.stderr
    assert (tmp_path / "a").glob("*/checkpoint-4")
    assert [s for s, _ in history(client, finished_run, "loss")] == list(range(2, 13, 2))

    crash(client, finished_run)  # its newest checkpoint is at max_steps: it finishes without training
    done = run_cli([*BASE_ARGS, *common, "--set", f"output_root={tmp_path / 'b'}", "--resume", "latest"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"({finished_run})" in done.stdout
    assert "Downloading checkpoints/step-00000012" in done.stdout + done.stderr


def test_corrupt_checkpoint_is_never_used(native_stack, finished_run, tmp_path):
    env = native_stack.client_env()
    client = client_for(native_stack)
    prefix = checkpoint_prefix(native_stack, client, finished_run)
    newest = _corrupt_newest(native_stack, client, finished_run)
    crash(client, finished_run)
    next_older = max(manifests_in_bucket(native_stack, prefix) - {newest})
    done = run_cli([*BASE_ARGS, "--set", "training.max_steps=12", "--set", "experiment.name=resume-choices",
                    "--set", "checkpoints.save_last_k=null", "--set", "checkpoints.save_top_k=null",
                    "--set", "checkpoints.monitor=null", "--set", f"output_root={tmp_path}", "--resume", finished_run],
                   env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert f"skipping checkpoint checkpoints/step-{newest:08d}" in output
    assert "model.safetensors does not match its manifest (crc32 " in output
    assert f"Downloading checkpoints/step-{next_older:08d}" in output


def bucket_state(native_stack) -> dict[str, int]:
    return native_stack.bucket_keys("artifacts/")


@pytest.mark.parametrize("case", ["unknown-run", "model-mismatch", "task-mismatch", "wrong-password", "no-checkpoint",
                                  "bad-data"])
def test_failed_resume_says_why_and_changes_nothing(native_stack, finished_run, tmp_path, case):
    env = native_stack.client_env()
    client = client_for(native_stack)
    args = [*BASE_ARGS, "--set", f"output_root={tmp_path}", "--set", "experiment.name=resume-choices",
            "--resume", finished_run]
    expect_rc, expect_text = 5, None
    if case == "unknown-run":
        args[-1] = "0123456789abcdef0123456789abcdef"
        expect_text = "run '0123456789abcdef0123456789abcdef' not found"
    elif case == "model-mismatch":
        other = tmp_path / "other-model"
        shutil.copytree(REPO / "configs/models/tiny-bert", other)
        args += ["--set", f"model.name_or_path={other}"]
        expect_text = "model.name_or_path"
    elif case == "task-mismatch":
        args += ["--set", "model.task=causal-lm", "--set", "checkpoints.monitor=null",
                 "--set", "checkpoints.save_top_k=null"]
        expect_text = "model.task"
    elif case == "wrong-password":
        env = {**env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
        expect_rc, expect_text = 3, "rejected the credentials"
    elif case == "no-checkpoint":
        done = run_cli(["--set", "training.max_steps=2", "--set", "training.save_strategy=no",
                        "--set", "training.eval_strategy=no", "--set", "checkpoints.monitor=null",
                        "--set", "checkpoints.save_top_k=null", "--set", f"output_root={tmp_path / 'x'}",
                        "--set", "experiment.name=resume-empty"], env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run,) = runs_of(client, "resume-empty")
        crash(client, run.info.run_id)
        args = ["--set", f"output_root={tmp_path}", "--set", "experiment.name=resume-empty",
                "--set", "checkpoints.monitor=null", "--set", "checkpoints.save_top_k=null",
                "--resume", run.info.run_id]
        expect_text = "has no complete checkpoint"
    elif case == "bad-data":
        # Found only while the model and data are built, which runs beside the claim and the
        # download: the claim, which held by then, is given back.
        crash(client, finished_run)  # the tests before finished it again
        bad = tmp_path / "no-text-column.csv"
        bad.write_text("sentence,label\nfine,1\nbad,0\n")
        args += ["--set", f"data.files.train={bad}", "--set", f"data.files.eval={bad}"]
        expect_rc, expect_text = 2, "column 'text' not in the training data"
    before = bucket_state(native_stack)
    status_before = client.get_run(finished_run).info.status
    lease_before = client.get_run(finished_run).data.tags.get(LEASE_TAG)
    done = run_cli(args, env)
    assert done.returncode == expect_rc, done.stdout[-2000:] + done.stderr[-2000:]
    assert expect_text in done.stderr
    assert bucket_state(native_stack) == before
    assert client.get_run(finished_run).info.status == status_before
    assert client.get_run(finished_run).data.tags.get(LEASE_TAG) == lease_before
    downloaded = list(tmp_path.glob("*/checkpoint-*"))
    # The claim held and its download finished before the error was raised; it stays on local disk.
    assert len(downloaded) == (1 if case == "bad-data" else 0), downloaded
