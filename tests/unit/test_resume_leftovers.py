"""What a resume on the dead trainer's own machine removes from the run's local folder, and what it keeps."""

from __future__ import annotations

import os

from mltrainer.callback import SNAPSHOT_DIR, snapshot
from mltrainer.resume import clear_dead_trainers_leftovers


def _checkpoint(run_dir, step: int):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "training_args.bin").write_bytes(b"args of step %d" % step)
    return folder


def test_checkpoints_past_the_resumed_step_and_every_snapshot_go_earlier_ones_stay(tmp_path):
    for step in (8, 12, 16, 20):
        _checkpoint(tmp_path, step)
    snapshot(tmp_path / "checkpoint-16", tmp_path / SNAPSHOT_DIR / "step-16")
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint of ours: left alone

    clear_dead_trainers_leftovers(tmp_path, 12)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-8", "checkpoint-notes"]
    assert (tmp_path / "checkpoint-12" / "training_args.bin").read_bytes() == b"args of step 12"


def test_a_stale_snapshot_is_replaced_not_merged_into_a_new_save(tmp_path):
    old = _checkpoint(tmp_path / "old", 16)
    (old / "only-in-the-old-save").write_bytes(b"stale")
    dst = tmp_path / SNAPSHOT_DIR / "step-16"
    snapshot(old, dst)
    new = _checkpoint(tmp_path / "new", 16)
    # The dead trainer's snapshot links the very file the new save rewrote in place.
    os.unlink(new / "training_args.bin")
    os.link(dst / "training_args.bin", new / "training_args.bin")

    snapshot(new, dst)

    assert sorted(p.name for p in dst.iterdir()) == ["training_args.bin"]
