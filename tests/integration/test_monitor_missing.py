"""A checkpoint policy whose monitored metric never appears at a save says so, and loses nothing.

``loss`` is a metric the trainer logs (so the config loads), but here it is logged every 3 steps
while checkpoints are saved every 4 of 8: no save ever has it. Before: ``upload: best`` stored
nothing at all and exited 0; with ``save_top_k``, ``checkpoint.best`` was never set; no warning
either way. Now: a warning at the first save without it, naming what was logged there; the final
save is stored even under ``upload: best``; and the command ends with exit 7 saying what happened.
"""

from __future__ import annotations

import pytest

from trainer_support import artifact_prefix, start_train, step_path, stored_checkpoints, trainer_client, unique_experiment

NEVER_AT_A_SAVE = ("training.max_steps=8", "training.save_steps=4", "training.logging_steps=3",
                   "checkpoints.monitor=loss")
CASES = {
    "best": ("checkpoints.upload=best", "checkpoints.save_last_k=null", "checkpoints.save_top_k=null"),
    "top_k": ("checkpoints.upload=every_save", "checkpoints.save_last_k=null", "checkpoints.save_top_k=1"),
}
WARNING = "checkpoints.monitor 'loss' is not among the metrics logged at step 4, where a checkpoint was saved"
ERROR = "checkpoint policy error: checkpoints.monitor 'loss' was not logged at any save (steps 4, 8)"


@pytest.fixture(scope="module")
def outcomes(native_stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    procs = {name: start_train(native_stack, root / name, unique_experiment(f"monitor-{name.replace('_', '-')}"),
                               *NEVER_AT_A_SAVE, *overrides)
             for name, overrides in CASES.items()}
    out = {}
    with trainer_client(native_stack) as client:
        for name, proc in procs.items():
            proc.wait(timeout=400)
            stdout, stderr = (p.read_text() for p in proc.logs)
            run_id = next(line.split("(")[1].split(")")[0] for line in stdout.splitlines() if line.startswith("Run "))
            run = client.get_run(run_id)
            out[name] = {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "status": run.info.status,
                         "tags": run.data.tags,
                         "stored": set(stored_checkpoints(native_stack, artifact_prefix(client, run_id)))}
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_monitor_never_logged_at_a_save_warns_and_fails_loudly(outcomes, case):
    got = outcomes[case]
    assert got["code"] == 7, got["stderr"][-3000:]
    warning = next(line for line in got["stderr"].splitlines() if WARNING in line)
    assert "(logged there: epoch, eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second)" in warning
    last = got["stderr"].strip().splitlines()[-1]
    assert last.startswith(ERROR), last
    assert "checkpoint.best is not set" in last
    assert f"the newest checkpoint is stored as {step_path(8)} (checkpoint.latest)" in last
    assert "Traceback" not in got["stderr"]
    assert got["status"] == "FINISHED"  # training itself finished; the policy could not rank
    assert got["tags"]["checkpoint.latest"] == step_path(8)
    assert "checkpoint.best" not in got["tags"]
    # best: stored although unranked, so the trained state is not lost. top_k: nothing ranks into
    # the top 1, and the newest checkpoint is never deleted.
    assert got["stored"] == {step_path(8)}

