"""CheckpointUploader.end_after_error: when training ends in an exception or Ctrl-C, every
checkpoint handed over is stored or named (with its local copy), and no worker thread is left.

Pure logic (the uploader's thread and queue) against the in-memory store of test_uploader.py.
"""

from __future__ import annotations

import threading

from test_uploader import KEEP_ALL, FakeStore, make_job

from mltrainer.uploader import CheckpointUploader, UploadError


def uploader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "checkpoint-uploader"}


def test_exception_after_queuing_stores_every_checkpoint_and_stops_the_worker(tmp_path):
    others = uploader_threads()  # left by other tests of this session
    store = FakeStore(delay=0.2)
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=2, max_retries=0)
    for step in (1, 2, 3):
        uploader.submit(make_job(tmp_path, step))
    error = RuntimeError("training blew up")
    assert uploader.end_after_error(error) == []
    assert sorted(store.manifests()) == [f"checkpoints/step-{s:08d}" for s in (1, 2, 3)]
    assert uploader_threads() == others
    assert not getattr(error, "__notes__", None)  # nothing to report


def test_ctrl_c_finishes_the_upload_in_flight_and_names_the_queued_ones(tmp_path):
    others = uploader_threads()  # left by other tests of this session
    store = FakeStore(delay=0.2)
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=2, max_retries=0, concurrency=1)
    uploader.submit(make_job(tmp_path, 1))
    assert store.busy.wait(5)  # step 1 is in flight
    uploader.submit(make_job(tmp_path, 2))
    uploader.submit(make_job(tmp_path, 3))
    interrupt = KeyboardInterrupt()
    not_stored = uploader.end_after_error(interrupt)
    assert sorted(store.manifests()) == ["checkpoints/step-00000001"]
    assert not_stored == [("checkpoints/step-00000002", tmp_path / "checkpoint-2"),
                          ("checkpoints/step-00000003", tmp_path / "checkpoint-3")]
    assert all((local / "model.safetensors").is_file() for _, local in not_stored)
    (note,) = interrupt.__notes__
    assert note.startswith("2 checkpoint(s) not stored, only on local disk:")
    assert f"checkpoints/step-00000002 (local copy: {tmp_path / 'checkpoint-2'})" in note
    assert uploader_threads() == others


def test_upload_error_is_not_named_twice_and_the_worker_stops(tmp_path):
    others = uploader_threads()  # left by other tests of this session
    store = FakeStore(always_fail=True)
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=2, max_retries=0)
    uploader.submit(make_job(tmp_path, 1))
    uploader.submit(make_job(tmp_path, 2))
    try:
        uploader.submit(make_job(tmp_path, 3))  # raises once step 1 or 2 failed for good
        uploader.close(progress=False)
    except UploadError as exc:
        error = exc
    not_stored = uploader.end_after_error(error)
    assert sorted(path for path, _ in not_stored) == [f"checkpoints/step-{s:08d}" for s in (1, 2, 3)]
    assert not getattr(error, "__notes__", None)  # the UploadError's own message names them all
    assert uploader_threads() == others
