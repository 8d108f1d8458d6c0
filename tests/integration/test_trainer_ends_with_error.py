"""A training that ends in an exception or Ctrl-C leaves no checkpoint unaccounted for: queued
checkpoints are stored (after an error) or named with their local copy (after Ctrl-C).

The trainer runs as a subprocess (fail_after_saves.py), so a checkpoint left to a background
thread is lost with the process, as it would be on a user's machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer_support import (REPO, artifact_prefix, step_path, stored_checkpoints, train_args, trainer_client,
                             trainer_env, unique_experiment)

DRIVER = Path(__file__).with_name("fail_after_saves.py")


def run_failing(stack, tmp_path: Path, kind: str) -> tuple[subprocess.CompletedProcess, str]:
    experiment = unique_experiment(f"ends-{kind}")
    # Saves at steps 4 and 8; every save is uploaded; no retention deletes either of them.
    args = train_args(tmp_path / "out", experiment, "checkpoints.save_last_k=5", "checkpoints.save_top_k=null")
    proc = subprocess.run([sys.executable, str(DRIVER), "2", kind, *args], cwd=REPO, env=trainer_env(stack),
                          capture_output=True, text=True, timeout=400)
    with trainer_client(stack) as client:
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, proc.stderr[-3000:]
    return proc, runs[0].info.run_id


def test_error_after_saves_still_stores_every_queued_checkpoint(native_stack, tmp_path):
    proc, run_id = run_failing(native_stack, tmp_path, "error")
    assert proc.returncode != 0 and "injected failure after save 2" in proc.stderr
    with trainer_client(native_stack) as client:
        assert client.get_run(run_id).info.status == "FAILED"
        prefix = artifact_prefix(client, run_id)
    stored = stored_checkpoints(native_stack, prefix)
    assert sorted(stored) == [step_path(4), step_path(8)], proc.stderr[-3000:]
    assert [stored[p]["step"] for p in sorted(stored)] == [4, 8]
    assert "not stored" not in proc.stderr


def test_ctrl_c_after_saves_names_the_checkpoints_left_local(native_stack, tmp_path):
    proc, run_id = run_failing(native_stack, tmp_path, "interrupt")
    assert proc.returncode != 0
    with trainer_client(native_stack) as client:
        assert client.get_run(run_id).info.status == "KILLED"
        prefix = artifact_prefix(client, run_id)
    stored = stored_checkpoints(native_stack, prefix)
    # The upload in flight (step 4) was finished; the queued one (step 8) was not started ...
    assert sorted(stored) == [step_path(4)], proc.stderr[-3000:]
    # ... and the exit says so, with where its bytes are.
    assert "1 checkpoint(s) not stored, only on local disk" in proc.stderr, proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if f"  - {step_path(8)} (local copy: " in ln)
    local = Path(line.split("(local copy: ", 1)[1].rstrip(")"))
    assert (local / "model.safetensors").is_file()
