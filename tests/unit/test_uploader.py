"""CheckpointUploader against in-memory stores: back-pressure, no dropped checkpoints, retries, errors.

Pure logic (the uploader's own thread and queue), so a fake store stands in for MLflow + S3; the
real store is exercised by tests/integration/test_trainer*.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mltrainer.manifest import MANIFEST_NAME, Manifest
from mltrainer.policy import CheckpointPolicy
from mltrainer.transfer import ArtifactMissingError, InFlightLimit
from mltrainer.uploader import CheckpointUploader, UploadError, UploadJob

KEEP_ALL = CheckpointPolicy()


class FakeStore:
    """Records uploaded files (store path -> bytes); each log_artifact takes ``delay`` seconds.

    ``fail_times`` makes the first N log_artifact calls raise (a transient outage); ``always_fail``
    makes every call raise (the store never comes back).
    """

    def __init__(self, delay: float = 0.0, fail_times: int = 0, always_fail: bool = False, copies: bool = True):
        self.delay = delay
        self.copies = copies
        self.copied: list[tuple[str, str]] = []  # (source, destination) of every copy asked for
        self.fail_times = fail_times
        self.always_fail = always_fail
        self.objects: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.deleted: list[str] = []
        self.lock = threading.Lock()
        self.busy = threading.Event()  # set once the worker is inside its first log_artifact

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        self.busy.set()
        time.sleep(self.delay)
        key = f"{artifact_path}/{Path(local_file).name}" if artifact_path else Path(local_file).name
        with self.lock:
            self.calls.append(key)
            if self.always_fail:
                raise ConnectionError(f"S3 unreachable while storing {key}")
            if self.fail_times > 0:
                self.fail_times -= 1
                raise ConnectionError(f"transient failure storing {key}")
            self.objects[key] = Path(local_file).read_bytes()

    def copy_within_run(self, source: str, artifact_path: str, name: str) -> bool:
        """A server-side copy, as the MLflow server makes it (``copies=False``: a server that makes none)."""
        with self.lock:
            self.copied.append((source, f"{artifact_path}/{name}"))
            if not self.copies:
                return False
            if source not in self.objects:
                raise ArtifactMissingError(source)
            self.objects[f"{artifact_path}/{name}"] = self.objects[source]
            return True

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        with self.lock:
            self.deleted.append(artifact_path)
            for key in [k for k in self.objects if k == artifact_path or k.startswith(f"{artifact_path}/")]:
                del self.objects[key]

    def manifests(self) -> dict[str, dict]:
        return {k.rsplit("/", 1)[0]: json.loads(v) for k, v in self.objects.items() if k.endswith(MANIFEST_NAME)}


def make_job(tmp_path: Path, step: int, payload: bytes | None = None) -> UploadJob:
    """A checkpoint folder with one shared file (same bytes every step) and one per-step file."""
    local = tmp_path / f"checkpoint-{step}"
    local.mkdir()
    (local / "config.json").write_text('{"same": "every step"}')
    (local / "model.safetensors").write_bytes(payload if payload is not None else f"weights {step}".encode())
    snap = tmp_path / "snapshots" / f"step-{step}"
    snap.mkdir(parents=True)
    for f in local.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return UploadJob(snap, local, f"checkpoints/step-{step:08d}", step, {"eval_loss": 1.0 / step})


def test_submit_blocks_only_when_the_queue_is_full_and_nothing_is_dropped(tmp_path):
    store = FakeStore(delay=0.5)  # 3 calls per checkpoint (2 files + manifest): ~1.5 s each
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=2, max_retries=0)
    waits = []
    for step in range(1, 6):
        started = time.monotonic()
        waited = uploader.submit(make_job(tmp_path, step))
        waits.append((waited, time.monotonic() - started))
        if step == 1:  # let the worker take the first job, so the queue itself holds the next two
            assert store.busy.wait(5)
    # 1st: taken by the worker at once; 2nd and 3rd: fill the queue of 2. None of them waits.
    for waited, elapsed in waits[:3]:
        assert waited == 0.0
        assert elapsed < 0.1
    # 4th and 5th: the queue is full while the worker is busy; submit waits and says so.
    for waited, elapsed in waits[3:]:
        assert waited > 0.3
        assert elapsed == pytest.approx(waited, abs=0.1)
    assert uploader.stats.waits == [w for w, _ in waits[3:]]
    uploader.close(progress=False)

    manifests = store.manifests()
    assert sorted(manifests) == [f"checkpoints/step-{s:08d}" for s in range(1, 6)]
    assert [m["step"] for _, m in sorted(manifests.items())] == [1, 2, 3, 4, 5]
    assert uploader.stats.checkpoints == 5
    assert uploader.pending() == 0
    # The manifest is always the last object of its checkpoint to be written.
    for path in manifests:
        own = [i for i, k in enumerate(store.calls) if k.startswith(path + "/")]
        assert store.calls[own[-1]] == f"{path}/{MANIFEST_NAME}"
    # config.json (identical every step) is sent once; every later folder gets it by a server-side
    # copy, so each folder is whole and its manifest lists only its own objects.
    assert [k for k in store.calls if k.endswith("config.json")] == ["checkpoints/step-00000001/config.json"]
    for path, m in manifests.items():
        assert {e["stored_at"] for e in m["files"]} == {f"{path}/config.json", f"{path}/model.safetensors"}
        assert store.objects[f"{path}/config.json"] == b'{"same": "every step"}'
    assert uploader.stats.deduplicated_bytes == 4 * len(b'{"same": "every step"}')
    # Snapshots of stored checkpoints are removed; the Trainer's own folders are left alone.
    assert not any((tmp_path / "snapshots").iterdir())
    assert all((tmp_path / f"checkpoint-{s}").is_dir() for s in range(1, 6))


def test_transient_failures_are_retried_with_backoff(tmp_path):
    store = FakeStore(fail_times=2)
    # One file at a time (close() would otherwise send both side by side), so the order of
    # attempts is fixed.
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=2, max_retries=3, backoff_seconds=0.1, concurrency=1)
    started = time.monotonic()
    uploader.submit(make_job(tmp_path, 4))
    uploader.close(progress=False)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.1 + 0.2  # backoff doubles: 0.1 s, then 0.2 s
    first = "checkpoints/step-00000004/config.json"
    assert store.calls[:3] == [first, first, first]  # failed twice, then stored
    assert sorted(store.manifests()) == ["checkpoints/step-00000004"]
    assert set(store.objects) == {
        "checkpoints/step-00000004/config.json",
        "checkpoints/step-00000004/model.safetensors",
        f"checkpoints/step-00000004/{MANIFEST_NAME}",
    }
    assert uploader.stats.checkpoints == 1


def test_failure_is_raised_at_next_submit_and_at_close_naming_the_checkpoint(tmp_path):
    store = FakeStore(always_fail=True)
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=2, max_retries=1, backoff_seconds=0.01)
    first = make_job(tmp_path, 4)
    uploader.submit(first)
    deadline = time.monotonic() + 5
    while uploader.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(UploadError) as raised:
        uploader.submit(make_job(tmp_path, 8))
    assert "checkpoints/step-00000004" in str(raised.value)
    assert str(first.local_checkpoint) in str(raised.value)
    # The checkpoint whose submit raised is not stored either, and is listed too.
    assert [f[0] for f in raised.value.failures] == ["checkpoints/step-00000004", "checkpoints/step-00000008"]
    assert "not attempted: an earlier upload failed" in str(raised.value)
    with pytest.raises(UploadError) as at_close:
        uploader.close(progress=False)
    assert [f[0] for f in at_close.value.failures] == ["checkpoints/step-00000004", "checkpoints/step-00000008"]
    assert store.manifests() == {}
    assert first.local_checkpoint.is_dir()
    assert first.snapshot.is_dir()  # the hard-linked copy is kept for a later retry


def test_store_never_comes_back_close_lists_every_checkpoint_kept_locally(tmp_path):
    store = FakeStore(always_fail=True)
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=4, max_retries=2, backoff_seconds=0.01, concurrency=1)
    jobs = [make_job(tmp_path, s) for s in (4, 8, 12)]
    for job in jobs:
        uploader.submit(job)  # queued before the first failure is known: no raise yet
    with pytest.raises(UploadError) as raised:
        uploader.close(progress=False)
    message = str(raised.value)
    assert message.startswith("3 checkpoint(s) were not stored")
    assert [f[0] for f in raised.value.failures] == [j.store_path for j in jobs]
    for job in jobs:
        assert job.store_path in message and str(job.local_checkpoint) in message
        assert job.local_checkpoint.is_dir() and (job.local_checkpoint / "model.safetensors").is_file()
    # Each file was tried 1 + max_retries times and the first file never got past it.
    assert len(store.calls) == 3 * 3
    assert store.manifests() == {}


def test_failure_at_submit_lists_queued_checkpoints_too(tmp_path):
    """Training stops at the first save after a failure; nothing queued behind it goes unreported."""
    store = FakeStore(always_fail=True, delay=0.2)
    uploader = CheckpointUploader(store, KEEP_ALL, queue_size=4, max_retries=0, backoff_seconds=0.01)
    jobs = [make_job(tmp_path, s) for s in (4, 8, 12)]
    for job in jobs:
        uploader.submit(job)
    deadline = time.monotonic() + 5
    while not uploader._failures and time.monotonic() < deadline:
        time.sleep(0.01)
    last = make_job(tmp_path, 16)
    with pytest.raises(UploadError) as raised:
        uploader.submit(last)
    listed = [f[0] for f in raised.value.failures]
    assert sorted(listed) == sorted(j.store_path for j in [*jobs, last])
    assert all(path.is_dir() for _, path, _ in raised.value.failures)
    assert store.manifests() == {}


def test_transfers_are_few_while_training_keeps_up_and_all_at_once_when_it_waits(tmp_path):
    limit = InFlightLimit(8)
    gate = threading.Event()
    seen: list[tuple[str, int]] = []  # (file stored, parts allowed while it went up)
    in_flight, most_in_flight = {}, {}  # step folder -> files being stored now / at most
    side_by_side = threading.Barrier(2, timeout=5)  # step 2's two new files must meet here

    class PacedStore(FakeStore):
        def log_artifact(self, local_file, artifact_path=None):
            with self.lock:
                seen.append((f"{artifact_path}/{Path(local_file).name}", limit.limit))
                in_flight[artifact_path] = in_flight.get(artifact_path, 0) + 1
                most_in_flight[artifact_path] = max(most_in_flight.get(artifact_path, 0), in_flight[artifact_path])
            if artifact_path.endswith("step-00000002") and Path(local_file).name != MANIFEST_NAME:
                side_by_side.wait()  # breaks (and the upload fails) if they went one at a time
            super().log_artifact(local_file, artifact_path)
            gate.wait(5)  # the test decides when step 1's files "finish"
            with self.lock:
                in_flight[artifact_path] -= 1

    store = PacedStore()
    uploader = CheckpointUploader(store, KEEP_ALL, part_limit=limit, background_parts=2, concurrency=4)
    first = make_job(tmp_path, 1)
    (first.snapshot / "tokenizer.json").write_text("{}")
    uploader.submit(first)
    assert store.busy.wait(5)
    time.sleep(0.2)  # room for a second file to start, were that allowed
    assert limit.limit == 2  # one checkpoint at a time, training not waiting: a few parts
    assert most_in_flight["checkpoints/step-00000001"] == 1  # and one file at a time
    second = make_job(tmp_path, 2)
    (second.snapshot / "tokenizer.json").write_text('{"step": 2}')
    uploader.submit(second)
    assert limit.limit == 8  # a save queued behind the upload: hurry
    gate.set()
    uploader.close(progress=False)
    assert limit.limit == 8  # the final drain: training waits for it
    step1, step2 = "checkpoints/step-00000001", "checkpoints/step-00000002"
    assert seen[0][1] == 2  # step 1's first file: at the background pace
    assert most_in_flight[step2] == 2  # model.safetensors and tokenizer.json at once (config.json: copied)
    assert all(parts == 8 for path, parts in seen if path.startswith(step2))
    assert sorted(store.manifests()) == [step1, step2]


def test_only_same_size_files_wait_for_their_hash_and_dedup_still_holds(tmp_path, monkeypatch):
    """A file whose size no stored file has cannot be a duplicate: it goes up without waiting for
    its hash; one of a stored size is hashed first and, when identical, not sent again. Either
    way the manifest lists every file with the digests of its bytes."""
    import hashlib
    import zlib

    import mltrainer.uploader as uploader_module

    store = FakeStore()
    up = CheckpointUploader(store, KEEP_ALL)
    up.submit(make_job(tmp_path, 1, b"weights one"))
    up.close(progress=False)

    events: list[tuple[str, str]] = []
    hashing = uploader_module.file_digest
    weights_sent = threading.Event()

    def recording_digest(path):
        if Path(path).name == "model.safetensors":  # its hash may wait for its upload, not the reverse
            events.append(("upload came first", str(weights_sent.wait(timeout=5))))
        events.append(("hashed", Path(path).name))
        return hashing(path)

    logged = store.log_artifact

    def recording_log(local_file, artifact_path=None):
        events.append(("uploaded", Path(local_file).name))
        logged(local_file, artifact_path)
        if Path(local_file).name == "model.safetensors":
            weights_sent.set()

    monkeypatch.setattr(uploader_module, "file_digest", recording_digest)
    store.log_artifact = recording_log
    up = CheckpointUploader(store, KEEP_ALL)
    up.adopt([Manifest.from_dict(m) for m in store.manifests().values()])
    job = make_job(tmp_path, 2, b"weights two, a new size")  # config.json: same bytes, same size as step 1
    up.submit(job)
    up.close(progress=False)

    assert ("uploaded", "config.json") not in events  # deduplicated
    assert ("upload came first", "True") in events
    assert events.index(("hashed", "config.json")) < events.index(("uploaded", "model.safetensors"))
    manifest = store.manifests()["checkpoints/step-00000002"]
    files = {f["path"]: f for f in manifest["files"]}
    assert files["config.json"]["stored_at"] == "checkpoints/step-00000002/config.json"  # copied, not referenced
    assert store.copied == [("checkpoints/step-00000001/config.json", "checkpoints/step-00000002/config.json")]
    weights = b"weights two, a new size"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert files["model.safetensors"]["crc32"] == f"{zlib.crc32(weights):08x}"
    assert store.objects["checkpoints/step-00000002/model.safetensors"] == weights


def test_storing_a_step_again_uploads_its_files_instead_of_pointing_at_the_old_ones(tmp_path):
    """A resumed run saves step 1 again: its files overwrite the old objects at that path, so the
    new manifest must not deduplicate against them (one of them may be overwritten by another
    file's new bytes)."""
    store = FakeStore()
    up = CheckpointUploader(store, KEEP_ALL)
    (tmp_path / "first").mkdir()
    up.submit(make_job(tmp_path / "first", 1, b"weights before the crash"))
    up.close(progress=False)

    resumed = CheckpointUploader(store, KEEP_ALL)
    resumed.adopt([Manifest.from_dict(m) for m in store.manifests().values()])
    (tmp_path / "again").mkdir()
    resumed.submit(make_job(tmp_path / "again", 1, b"weights after resuming"))
    resumed.close(progress=False)

    files = {f["path"]: f for f in store.manifests()["checkpoints/step-00000001"]["files"]}
    assert {f["stored_at"] for f in files.values()} == {"checkpoints/step-00000001/config.json",
                                                        "checkpoints/step-00000001/model.safetensors"}
    assert store.calls.count("checkpoints/step-00000001/config.json") == 2
    assert store.objects["checkpoints/step-00000001/model.safetensors"] == b"weights after resuming"
