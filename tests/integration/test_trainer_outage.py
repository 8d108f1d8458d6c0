"""The S3 server stops answering mid-training (SIGSTOP of the session stack's SeaweedFS process).

* It comes back after a while: training never stopped, pending uploads finish, exit 0, and the
  store ends up holding exactly what the policy says.
* It never comes back: exit 4, the error names every checkpoint that was not stored, and their
  local folders are still there.

The S3 process is always resumed (SIGCONT) in a ``finally``, so the stack survives for the tests
after these.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time

import psutil
import pytest

from trainer_support import (
    artifact_prefix, expected_best, finish, metric_steps, read_object, start_train, step_path, stored_checkpoints,
    trainer_client, trainer_env, unique_experiment, wait_for,
)


@pytest.fixture(scope="module")
def client(native_stack):
    with trainer_client(native_stack) as c:
        yield c


def s3_processes(native_stack) -> list[psutil.Process]:
    handle = native_stack.stack.handle("s3")
    root = handle.process() if handle else None
    assert root is not None, "the session stack's S3 server is not running"
    return [root, *root.children(recursive=True)]


@contextlib.contextmanager
def s3_frozen(native_stack):
    """SIGSTOP the S3 server's process tree; SIGCONT it on the way out, whatever happens."""
    procs = s3_processes(native_stack)
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)


def run_of(client, experiment: str) -> str:
    def find():
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0].info.run_id if runs else None

    return wait_for(find, timeout=120, what=f"a run in experiment {experiment}", interval=0.5)


def first_checkpoint_stored(stack, client, experiment: str) -> tuple[str, str]:
    """Wait until the run's first checkpoint (step 4) is in the bucket; its run id and bucket prefix."""
    run_id = run_of(client, experiment)
    prefix = artifact_prefix(client, run_id)
    wait_for(lambda: step_path(4) in stored_checkpoints(stack, prefix), timeout=180,
             what="the first checkpoint in the store")
    return run_id, prefix


def local_steps(run_dir_parent, run_id: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in run_dir_parent.glob(f"*-{run_id}/checkpoint-*")}


def test_s3_outage_training_goes_on_and_pending_uploads_finish(native_stack, client, tmp_path):
    experiment = unique_experiment("trainer-outage")
    # A queue long enough for the whole outage: training must not wait on the store at all.
    proc = start_train(native_stack, tmp_path, experiment, "training.max_steps=40", "upload.queue_size=10",
                       "upload.max_retries=8", "upload.backoff_seconds=1")
    try:
        run_id, prefix = first_checkpoint_stored(native_stack, client, experiment)
        with s3_frozen(native_stack):
            stopped = time.monotonic()
            at_stop = max(local_steps(tmp_path, run_id))
            # Training goes on while the store is down: new checkpoints keep being saved locally.
            wait_for(lambda: max(local_steps(tmp_path, run_id)) >= min(at_stop + 8, 40), timeout=60,
                     what="training to save two more checkpoints while S3 is stopped")
            during = max(local_steps(tmp_path, run_id))
            time.sleep(max(0.0, 8 - (time.monotonic() - stopped)))  # an outage of at least 8 s
            assert proc.poll() is None  # still waiting for its uploads: nothing was given up
        run = finish(proc, timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert run.run_id == run_id and run.step == 40
    assert during >= min(at_stop + 8, 40)

    saves = set(range(4, 41, 4))
    evals = metric_steps(client, run_id, "eval_loss")
    assert [s for s, _ in evals] == sorted(saves)
    best = expected_best(evals, saves)
    stored = stored_checkpoints(native_stack, prefix)
    assert set(stored) == {step_path(36), step_path(40), step_path(best)}
    assert all(m["step"] == int(p.rsplit("-", 1)[1]) for p, m in stored.items())
    tags = client.get_run(run_id).data.tags
    assert tags["checkpoint.latest"] == step_path(40)
    assert tags["checkpoint.best"] == step_path(best)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_s3_never_comes_back_exit_4_lists_checkpoints_kept_locally(native_stack, client, tmp_path):
    experiment = unique_experiment("trainer-s3-gone")
    # A stuck request must fail in seconds, not after MLflow's default 120 s timeout and 7 retries.
    env = trainer_env(native_stack, MLFLOW_HTTP_REQUEST_TIMEOUT="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    proc = start_train(native_stack, tmp_path, experiment, "training.max_steps=40",
                       "upload.max_retries=1", "upload.backoff_seconds=0.2", env=env)
    try:
        run_id, prefix = first_checkpoint_stored(native_stack, client, experiment)
        with s3_frozen(native_stack):
            proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.logs[1].read_text()
    assert proc.returncode == 4, stderr[-4000:]
    message = stderr[stderr.index("upload error: "):]
    failed = re.findall(r"^  - (checkpoints/step-(\d{8})) \(local copy: (\S+)\): ", message, re.M)
    assert failed, message
    assert re.match(r"upload error: \d+ checkpoint\(s\) were not stored:", message)
    for path, step, local in failed:
        assert local.endswith(f"-{run_id}/checkpoint-{int(step)}")
        assert (tmp_path / local.split(str(tmp_path) + "/", 1)[1]).is_dir()
        assert list((tmp_path / local.split(str(tmp_path) + "/", 1)[1]).glob("model.safetensors"))
    assert step_path(8) in [p for p, _, _ in failed]
    time.sleep(2)  # S3 is back: anything the server had in flight lands now
    # A request the trainer gave up on may still land once S3 is back, the manifest of step 8
    # included (seen in CI): then every file it names went up before it, so the checkpoint is
    # whole. What must hold: step 4 is stored, nothing else is unless it was reported, and every
    # stored checkpoint has all its files at their sizes.
    stored = stored_checkpoints(native_stack, prefix)
    assert step_path(4) in stored
    assert set(stored) <= {step_path(4)} | {p for p, _, _ in failed}
    for manifest in stored.values():
        for entry in manifest["files"]:
            assert len(read_object(native_stack, prefix + entry["stored_at"])) == entry["size"], entry
    assert client.get_run(run_id).info.status == "FAILED"
