"""The callback names each checkpoint by the template, and never drops one whose name cannot be stored."""

import logging
from types import SimpleNamespace

import pytest

from mltrainer import tracking
from mltrainer.callback import StoreCheckpointsCallback
from mltrainer.config import checkpoint_policy
from mltrainer.policy import RetentionState


class RecordingUploader:
    def __init__(self):
        self.retention = RetentionState()
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)
        return 0.0


class NoClient:
    def log_batch(self, *args, **kwargs):
        pass


@pytest.fixture(autouse=True)
def no_tracking_store(monkeypatch):
    # Flushing MLflow's async queue opens the default store: a SQLite file in the working directory.
    monkeypatch.setattr(tracking, "flush_metrics", lambda: None)


def save_at(tmp_path, template, metrics):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"weights")
    uploader = RecordingUploader()
    callback = StoreCheckpointsCallback(client=NoClient(), run_id="r", uploader=uploader, is_main=True,
                                        policy=checkpoint_policy({"path_template": template}),
                                        snapshot_root=tmp_path / ".snapshots")
    state = SimpleNamespace(global_step=4, max_steps=8, epoch=0.5)
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.on_log(args, state, None, logs=metrics)
    callback.on_save(args, state, None)
    return uploader.jobs


def test_checkpoint_is_named_by_the_template(tmp_path):
    (job,) = save_at(tmp_path, "{loss:.3f}-{step}", {"loss": 0.25})
    assert job.store_path == "checkpoints/0.250-4"


def test_a_name_too_long_for_the_store_falls_back_to_the_default_name(tmp_path, caplog):
    # A loss of 1e300 with 4 decimals renders 300+ digits: more than a key component can hold.
    with caplog.at_level(logging.WARNING, logger="mltrainer.callback"):
        (job,) = save_at(tmp_path, "{loss:.4f}-{step}", {"loss": 1e300})
    assert job.store_path == "checkpoints/step-00000004"
    assert "the store reads back at most 255 per component" in caplog.text
    assert "this checkpoint is stored as checkpoints/step-00000004 instead" in caplog.text
