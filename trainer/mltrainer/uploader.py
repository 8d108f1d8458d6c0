"""Background checkpoint uploads: one worker thread fed by a bounded queue.

- The caller hands over a *snapshot* (hard links of the checkpoint folder), so the Trainer's
  ``save_total_limit`` rotation cannot pull files from under an upload.
- Hashing, uploading and retention deletes all happen on the worker (and threads it starts);
  ``submit`` only blocks when the queue is full, and then says for how long it waited. A
  checkpoint is never dropped.
- A checkpoint is complete in the store only once its manifest is there; the manifest goes last.
- Every checkpoint folder is whole: its manifest lists only objects inside it, so a folder
  downloaded from the UI loads on its own. A file byte-identical to one already stored in the run
  (config.json, tokenizer files) is still not sent again: the MLflow server copies the stored
  object inside S3 (``RunArtifacts.copy_within_run``; a server that cannot gets the bytes). The
  digest index is updated only after a successful upload, so a failed upload is retried in full.
- Runs stored before folders were whole have manifests whose ``stored_at`` points into an older
  folder (deduplication by reference). They still resume and evict: an object is deleted only
  once no kept manifest lists it.
- ``on_stored`` runs after each checkpoint is complete and retention has acted; ``on_evicting``
  before an evicted checkpoint's manifest goes (mltrainer.checkpoint_models keeps one MLflow
  LoggedModel per complete checkpoint through them).
- While training runs and the uploads keep up, files go up one at a time and each
  ``background_parts`` parts at a time (given the store's ``InFlightLimit``), so uploads take the
  host's cores in small sips rather than bursts; once training waits on them (``close``, or
  saves queueing up) ``concurrency`` files go side by side, each with all its parts.
- Transient failures retry with exponential backoff. A checkpoint that still fails is kept on
  local disk and reported: the error is re-raised on the next ``submit`` and by ``close``.
- When training ends with an exception instead, ``end_after_error`` still accounts for every
  checkpoint handed over: stored, or logged by name with its local copy; and the worker stops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from mltrainer.errors import EXIT_UPLOAD, MltrainerError
from mltrainer.config import UploadConfig
from mltrainer.manifest import MANIFEST_NAME, FileDigest, Manifest, build_manifest, checkpoint_files, file_digest
from mltrainer.nodes import NodeFilesError, NodeReports, OtherNodesFiles
from mltrainer.policy import CheckpointPolicy, RetentionState
from mltrainer.transfer import ArtifactMissingError, InFlightLimit

logger = logging.getLogger(__name__)


class ArtifactStore(Protocol):
    """What the uploader needs from a run's artifact store (an MLflow artifact repository)."""

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None: ...

    def delete_artifacts(self, artifact_path: str | None = None) -> None: ...

    def copy_within_run(self, source: str, artifact_path: str, name: str) -> bool: ...

    def list_artifacts(self, path: str | None = None) -> list: ...  # only for other nodes' files


class UploadError(MltrainerError):
    """Checkpoints that could not be stored; they are still on local disk."""

    exit_code = EXIT_UPLOAD
    label = "upload error"

    def __init__(self, failures: list[tuple[str, Path, BaseException]]):
        self.failures = failures
        lines = [f"  - {path} (local copy: {local}): {type(exc).__name__}: {exc}" for path, local, exc in failures]
        super().__init__(f"{len(failures)} checkpoint(s) were not stored:\n" + "\n".join(lines))


@dataclass
class UploadJob:
    snapshot: Path  # hard-linked copy; deleted after a successful upload
    local_checkpoint: Path  # the Trainer's folder, named in error messages
    store_path: str
    step: int
    metrics: dict[str, Any]
    # Multi-node training: files of this checkpoint that other nodes store (mltrainer.nodes);
    # the manifest waits for them.
    other_nodes: OtherNodesFiles | None = None


@dataclass
class UploadStats:
    uploaded_bytes: int = 0
    deduplicated_bytes: int = 0  # identical to a stored file: copied by the server, not sent
    checkpoints: int = 0
    waits: list[float] = field(default_factory=list)  # seconds training waited on a full queue, per save
    final_wait_s: float = 0.0  # seconds close() waited for the uploads still queued or running


_STOP = object()


def stop_worker(queue, thread, stop, lock, failures: list) -> None:
    """Ask an upload worker to stop after what is queued, wait for it, raise what it failed to store."""
    queue.put(stop)
    thread.join()
    with lock:
        failed = list(failures)
    if failed:
        raise UploadError(failed)


def _lower_thread_priority(niceness: int = 10) -> None:
    """Let the training thread win the CPU: hashing and HTTP for uploads can wait a little.

    On Linux a thread has its own nice value (setpriority on its native id); elsewhere this is
    a no-op.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def retry(what: str, action: Callable[[], Any], max_retries: int, backoff_seconds: float) -> Any:
    """``action()``'s result, retried with backoff; a missing object is final (not retried)."""
    delay = backoff_seconds
    for attempt in range(1, max_retries + 2):
        try:
            return action()
        except ArtifactMissingError:
            raise
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            if attempt > max_retries:
                raise
            logger.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", what, attempt,
                           max_retries + 1, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)


def _local_copy(job: UploadJob) -> Path:
    """Where the bytes of a checkpoint that was not stored are: the Trainer's folder, or our
    snapshot when ``save_total_limit`` already rotated that away."""
    return job.local_checkpoint if job.local_checkpoint.exists() else job.snapshot


class CheckpointUploader:
    def __init__(
        self,
        store: ArtifactStore,
        policy: CheckpointPolicy,
        *,
        retention: RetentionState | None = None,
        # defaults: the config schema's (one place for each), for callers without a config
        queue_size: int = UploadConfig.queue_size,
        max_retries: int = UploadConfig.max_retries,
        backoff_seconds: float = UploadConfig.backoff_seconds,
        on_stored: Callable[[Manifest, RetentionState], None] | None = None,
        on_evicting: Callable[[str], None] | None = None,
        concurrency: int = 4,
        part_limit: InFlightLimit | None = None,
        background_parts: int = UploadConfig.background_parts,
    ):
        self.store = store
        self.policy = policy
        self.retention = retention or RetentionState()
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.on_stored = on_stored
        self.on_evicting = on_evicting
        self.concurrency = max(1, concurrency)
        self.stats = UploadStats()
        self._part_limit = part_limit
        self._all_parts = part_limit.limit if part_limit else 0
        self.background_parts = max(1, background_parts)
        self._closing = False
        self._file_limit = InFlightLimit(1)  # files of one checkpoint in flight
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._digests: dict[str, str] = {}  # sha256 -> store path of a stored object in this run
        self._manifests: dict[str, Manifest] = {}  # store path of checkpoint -> its manifest
        self._failures: list[tuple[str, Path, BaseException]] = []
        self._in_flight: UploadJob | None = None  # the checkpoint the worker is storing now
        self._node_reports: NodeReports | None = None  # multi-node training: where other nodes report
        self._reported = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------------

    def adopt(self, manifests: list[Manifest]) -> None:
        """Know what a resumed run already stored, so dedup and retention span the resume."""
        for manifest in manifests:
            self._manifests[manifest.store_path] = manifest
            self._digests.update(manifest.digest_index())

    def submit(self, job: UploadJob) -> float:
        """Queue a checkpoint; returns the seconds training waited for room in the queue.

        After an upload failed for good this raises instead, listing every checkpoint that is not
        in the store: the failed ones, those still queued, and ``job``.
        """
        with self._lock:
            failed = len(self._failures) > self._reported
        if failed:
            self._stop_and_account([job])
        if job.other_nodes is not None:
            self._node_reports = job.other_nodes.reports
        started = time.monotonic()
        try:
            self._queue.put_nowait(job)
            self._pace()
            return 0.0
        except queue.Full:
            self._pace(hurry=True)
            logger.warning("upload queue full (%d pending): training waits for %s", self._queue.qsize(), job.store_path)
            self._queue.put(job)
            waited = time.monotonic() - started
            logger.warning("training waited %.2fs for the upload queue", waited)
            self.stats.waits.append(waited)
            return waited

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def _stop_and_account(self, also: list[UploadJob]) -> None:
        abandoned = [*also, *self._unqueue_all()]
        self._queue.join()  # the upload in flight ends, stored or failed, so the list is exact
        with self._lock:
            for item in abandoned:
                self._failures.append((item.store_path, _local_copy(item),
                                       RuntimeError("not attempted: an earlier upload failed")))
            failures = list(self._failures)
            self._reported = len(self._failures)
        raise UploadError(failures)

    def close(self, progress: bool = True) -> None:
        """Drain the queue (with a progress bar), stop the worker, raise every failure."""
        started = time.perf_counter()
        self._closing = True
        self._pace()
        total = self._queue.unfinished_tasks
        bar = None
        if progress and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="Uploading checkpoints", unit="ckpt")
        while self._queue.unfinished_tasks:
            time.sleep(0.01)
            done = total - self._queue.unfinished_tasks
            if bar is not None and done > bar.n:
                bar.update(done - bar.n)
        if bar is not None:
            bar.close()
        self.stats.final_wait_s = time.perf_counter() - started
        stop_worker(self._queue, self._thread, _STOP, self._lock, self._failures)

    def end_after_error(self, error: BaseException, store_queued: bool | None = None) -> list[tuple[str, Path]]:
        """Training ended with ``error``: no checkpoint unaccounted for, no worker left behind.

        After an exception the queued checkpoints are still stored (a crashed run resumes from
        its latest stored one). After Ctrl-C the user wants out: the upload in flight finishes,
        the queued ones are not started; a second Ctrl-C stops that wait too. ``store_queued``
        overrides that choice (default: store them unless ``error`` is a KeyboardInterrupt).
        Every checkpoint not in the store is logged, and added as a note to ``error`` (unless
        ``error`` is the UploadError naming it), so the traceback or message says what is only
        local. Returns their ``(store path, local copy)``. Never raises an upload error: the
        exception that ended training matters more.
        """
        if store_queued is None:
            store_queued = not isinstance(error, KeyboardInterrupt)
        if self._node_reports is not None:  # a dead node never reports: bounded wait from here
            self._node_reports.hurry()
        try:
            not_stored = self._finish_after_error(store_queued, why=f"training ended with {type(error).__name__}")
        finally:
            self._note_not_stored(error)
        return not_stored

    def _finish_after_error(self, store_queued: bool, why: str) -> list[tuple[str, Path]]:
        if not store_queued:
            self._take_queued(why)
        if self._thread.is_alive():
            self._closing = True
            self._pace()
            try:
                self._queue.put(_STOP)
                self._thread.join()
            except KeyboardInterrupt:
                # Interrupted while waiting: what is in flight or queued is left, and said so. The
                # worker is a daemon thread, so it does not keep the process alive.
                self._take_queued("training was interrupted")
                if (job := self._in_flight) is not None:
                    with self._lock:
                        self._failures.append((job.store_path, _local_copy(job),
                                               RuntimeError("upload interrupted")))
                self._log_not_stored()
                raise
        return self._log_not_stored()

    def _take_queued(self, why: str) -> None:
        """Take every queued checkpoint off the queue unstarted, recorded as not stored."""
        for item in self._unqueue_all():
            with self._lock:
                self._failures.append((item.store_path, _local_copy(item), RuntimeError(f"not attempted: {why}")))

    def _unqueue_all(self) -> list[UploadJob]:
        """Empty the queue without running anything; the checkpoints it held (not the stop marker)."""
        taken = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return taken
            if item is not _STOP:
                taken.append(item)
            self._queue.task_done()

    def _note_not_stored(self, error: BaseException) -> None:
        named = {path for path, _, _ in error.failures} if isinstance(error, UploadError) else set()
        with self._lock:
            unnamed = [(path, local) for path, local, _ in self._failures if path not in named]
        if unnamed:
            error.add_note(f"{len(unnamed)} checkpoint(s) not stored, only on local disk:\n"
                           + "\n".join(f"  - {path} (local copy: {local})" for path, local in unnamed))

    def _log_not_stored(self) -> list[tuple[str, Path]]:
        with self._lock:
            not_stored = [(path, local) for path, local, _ in self._failures]
        for path, local in not_stored:
            logger.error("checkpoint %s is not in the store; its only copy is local: %s", path, local)
        return not_stored

    def _pace(self, hurry: bool = False) -> None:
        """Everything at once when training waits or will (closing, a save queued behind the
        upload running now): ``concurrency`` files, all parts. Otherwise one file at a time,
        ``background_parts`` parts at a time."""
        hurry = hurry or self._closing or self._queue.qsize() > 0
        self._file_limit.set(self.concurrency if hurry else 1)
        if self._part_limit is not None:
            self._part_limit.set(self._all_parts if hurry else self.background_parts)

    # -- worker side ---------------------------------------------------------------------------

    def _work(self) -> None:
        _lower_thread_priority()
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                self._pace()
                self._in_flight = job
                try:
                    self._store_checkpoint(job)
                    shutil.rmtree(job.snapshot, ignore_errors=True)
                except BaseException as exc:  # noqa: BLE001 - reported to the training thread
                    logger.error("checkpoint %s not stored: %s", job.store_path, exc)
                    with self._lock:
                        self._failures.append((job.store_path, _local_copy(job), exc))
            finally:
                self._in_flight = None
                self._queue.task_done()

    def _retry(self, what: str, action: Callable[[], Any]) -> Any:
        return retry(what, action, self.max_retries, self.backoff_seconds)

    def _store_checkpoint(self, job: UploadJob) -> None:
        files = checkpoint_files(job.snapshot)
        # A resumed run saves a step it stored before at the same path: those objects are about
        # to be overwritten, so none of them may be the source of a copy.
        own = job.store_path.rstrip("/") + "/"
        stored_digests = {digest: at for digest, at in self._digests.items() if not at.startswith(own)}
        # Hashing takes 0.76 CPU-s per GB (bench/); only a file with the size of one already stored can
        # be a copy, so only those are hashed before their transfer is decided. Every other file
        # starts up at once and is hashed meanwhile, for the manifest that goes last.
        sizes = {rel: local.stat().st_size for rel, local in files}
        stored_sizes = {e.size for m in self._manifests.values() for e in m.files if e.sha256 in stored_digests}
        digests: dict[str, FileDigest] = {rel: file_digest(local) for rel, local in files if sizes[rel] in stored_sizes}
        copies = {rel: stored_digests[d.sha256] for rel, d in digests.items() if d.sha256 in stored_digests}
        to_upload = [rel for rel, _ in files if rel not in copies]
        moved = {"sent": 0, "copied": 0}  # bytes of this checkpoint, for its log line

        def upload(rel: str) -> None:
            local = job.snapshot / rel
            parent = os.path.dirname(f"{job.store_path}/{rel}")
            with self._file_limit:
                self._retry(f"upload of {job.store_path}/{rel}", lambda: self.store.log_artifact(str(local), parent))
            with self._lock:
                self.stats.uploaded_bytes += sizes[rel]
                moved["sent"] += sizes[rel]

        def copy(rel: str) -> None:
            parent, name = os.path.split(f"{job.store_path}/{rel}")
            with self._file_limit:
                try:
                    copied = self._retry(f"copy of {copies[rel]} to {parent}/{name}",
                                         lambda: self.store.copy_within_run(copies[rel], parent, name))
                except ArtifactMissingError:
                    copied = False  # the stored copy is gone (deleted behind our back): send the bytes
            if not copied:
                upload(rel)
                return
            with self._lock:
                self.stats.deduplicated_bytes += sizes[rel]
                moved["copied"] += sizes[rel]

        # When training waits, the files of one checkpoint go up side by side (largest first):
        # the small files' round trips through the server (a dozen in a Trainer checkpoint,
        # most of the final wait) hide behind the large ones. The manifest still goes last,
        # after every file succeeded.
        transfers = [(upload, rel) for rel in to_upload] + [(copy, rel) for rel in copies]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash",
                                initializer=_lower_thread_priority) as hasher:
            hashed = hasher.submit(lambda: {rel: file_digest(local) for rel, local in files if rel not in digests})
            if self.concurrency > 1 and len(transfers) > 1:
                transfers.sort(key=lambda t: sizes[t[1]], reverse=True)
                with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="checkpoint-upload") as pool:
                    for future in [pool.submit(action, rel) for action, rel in transfers]:
                        future.result()
            else:
                for action, rel in transfers:
                    action(rel)
            digests.update(hashed.result())
        # Other nodes' files of a multi-node training: their digests once each node says they are stored.
        elsewhere = job.other_nodes.collect() if job.other_nodes is not None else {}
        # Every file is now stored inside this checkpoint's own folder: no stored_digests.
        manifest = build_manifest(job.snapshot, step=job.step, metrics=job.metrics, store_path=job.store_path,
                                  digests=digests, elsewhere=elsewhere)
        if {e.path for e in manifest.files} != set(to_upload) | set(copies) | set(elsewhere):
            # a manifest naming a missing object
            raise RuntimeError(f"{job.store_path}: the stored files and the manifest disagree; manifest not stored")
        if elsewhere:
            self._check_other_nodes_stored(job, manifest, elsewhere)
        with tempfile.TemporaryDirectory() as tmp:
            manifest_file = Path(tmp) / MANIFEST_NAME
            manifest_file.write_text(manifest.to_json())
            self._retry(f"upload of {job.store_path}/{MANIFEST_NAME}",
                        lambda: self.store.log_artifact(str(manifest_file), job.store_path))
        logger.info("stored checkpoint %s: %d bytes sent, %d bytes of unchanged files copied by the server",
                    job.store_path, moved["sent"], moved["copied"])
        self._manifests[job.store_path] = manifest
        self._digests.update(manifest.digest_index())
        self.retention.record_stored(job.store_path, job.step, job.metrics)
        self.stats.checkpoints += 1
        self._apply_retention()
        if self.on_stored is not None:
            self._retry(f"on_stored({job.store_path})", lambda: self.on_stored(manifest, self.retention))

    def _check_other_nodes_stored(self, job: UploadJob, manifest: Manifest, elsewhere: dict[str, FileDigest]) -> None:
        """Each node said its files are in; a listing of the store must show each with its size
        too: a node's word alone (a bug, an upload that went elsewhere) must not make a
        checkpoint complete that is not."""
        from mltrainer.verify import object_problems

        theirs = dataclasses.replace(manifest, files=tuple(e for e in manifest.files if e.path in elsewhere))
        if problems := object_problems(self.store, [theirs])[manifest.store_path]:
            node_of = {rel: node for node, rels in job.other_nodes.files.items() for rel in rels}
            by_path = {e.stored_at: e.path for e in theirs.files}
            named = [f"node {node_of[by_path[p.split(':')[0]]]}: {p}" for p in problems]
            raise NodeFilesError(f"{job.store_path}: files other nodes reported stored are not in the store "
                                 f"({'; '.join(named)}); manifest not stored")

    def _apply_retention(self) -> None:
        for path in self.retention.evictions(self.policy):
            self._delete_checkpoint(path)

    def _delete_checkpoint(self, path: str) -> None:
        """Its LoggedModel and manifest first, so the checkpoint stops being listed and counting as
        complete before any file goes; then its folder, whole.

        A kept checkpoint of the earlier layout may list objects by reference (``stored_at`` in
        this folder): those stay, and so this folder, until no kept manifest lists them. Objects
        this manifest lists in other folders (that layout again, a folder evicted earlier) go as
        soon as no kept manifest lists them: no evicted folder is left holding files forever.
        """
        manifest = self._manifests.pop(path, None)
        if self.on_evicting is not None:
            self._retry(f"on_evicting({path})", lambda: self.on_evicting(path))
        self._retry(f"delete of {path}/{MANIFEST_NAME}", lambda: self.store.delete_artifacts(f"{path}/{MANIFEST_NAME}"))
        kept = {e.stored_at for m in self._manifests.values() for e in m.files}
        inside = path.rstrip("/") + "/"
        folder_still_listed = any(at.startswith(inside) for at in kept)
        if not folder_still_listed:
            self._retry(f"delete of {path}", lambda: self.store.delete_artifacts(path))
        for stored_at in [e.stored_at for e in manifest.files] if manifest else []:
            gone_with_folder = stored_at.startswith(inside) and not folder_still_listed
            if stored_at not in kept and not gone_with_folder:
                self._retry(f"delete of {stored_at}", lambda: self.store.delete_artifacts(stored_at))
        self._digests = {d: at for m in self._manifests.values() for d, at in m.digest_index().items()}
        self.retention.mark_deleted(path)
        logger.info("retention: deleted checkpoint %s from the store", path)
