"""torchrun with two CPU processes (gloo): one MLflow run, every checkpoint stored once, every metric once.

Rank 0 creates the run and shares its id; only rank 0 logs metrics and uploads checkpoints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from trainer_support import (
    MANIFEST, REPO, RUN_LINE, TINY, artifact_prefix, metric_steps, read_object, sha256, step_path,
    stored_checkpoints, trainer_client, trainer_env, unique_experiment,
)

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_torchrun_two_cpu_ranks_make_one_run_and_upload_each_checkpoint_once(native_stack, tmp_path):
    experiment = unique_experiment("trainer-ddp")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "mltrainer.cli", "--config", TINY,
           "--set", "training.max_steps=8", "--set", f"output_root={tmp_path}",
           "--set", f"experiment.name={experiment}"]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(native_stack, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    # Both ranks trained, in the same run and the same local directory.
    trains_in = re.findall(r"INFO mltrainer\.train: run ([0-9a-f]{32}) trains in (\S+)", proc.stderr)
    assert len(trains_in) == 2 and trains_in[0] == trains_in[1], trains_in
    run_id, run_dir = trains_in[0]
    assert [m["run_id"] for m in RUN_LINE.finditer(proc.stdout)] == [run_id]  # only rank 0 reports
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(run_dir).name]

    with trainer_client(native_stack) as client:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        assert runs[0].info.status == "FINISHED"
        for key in ("loss", "eval_loss", "learning_rate"):
            steps = [s for s, _ in metric_steps(client, run_id, key)]
            assert steps and not [s for s, n in Counter(steps).items() if n > 1], (key, steps)
        assert [s for s, _ in metric_steps(client, run_id, "eval_loss")] == [4, 8]
        assert [s for s, _ in metric_steps(client, run_id, "loss")] == [2, 4, 6, 8]
        prefix = artifact_prefix(client, run_id)
        tags = client.get_run(run_id).data.tags

    stored = stored_checkpoints(native_stack, prefix)
    assert set(stored) == {step_path(4), step_path(8)}
    assert tags["checkpoint.latest"] == step_path(8)
    # One manifest per checkpoint, and the bucket holds exactly what the manifests reference.
    keys = {k[len(prefix):] for k in native_stack.bucket_keys(prefix + "checkpoints/")}
    assert sorted(k for k in keys if k.endswith(MANIFEST)) == sorted(f"{p}/{MANIFEST}" for p in stored)
    referenced = {e["stored_at"]: e["sha256"] for m in stored.values() for e in m["files"]}
    assert keys == set(referenced) | {f"{p}/{MANIFEST}" for p in stored}
    for stored_at, digest in referenced.items():
        assert sha256(read_object(native_stack, prefix + stored_at)) == digest
