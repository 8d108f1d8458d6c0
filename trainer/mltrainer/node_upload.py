"""A non-main node's share of each checkpoint: the files only it has, stored in the background.

The main process (mltrainer.uploader) stores everything node 0 has and writes the manifest; on
every other node one process (its local rank 0) stores the files no lower node has (which ones:
mltrainer.nodes) into the same checkpoint folder of the run, then reports their digests, or the
error that stopped it, to the main process, which waits for that report before the manifest.

Like the main uploader: it works on a hard-linked snapshot (the Trainer may rotate the folder
away meanwhile), retries transient failures, never drops a checkpoint silently (a failure is
re-raised on the next ``submit`` and by ``close``), and training does not wait on the network
unless the bounded queue is full. There is no deduplication and no retention here: a node's own
files (RNG states, shards) change at every save, and eviction removes the whole folder from the
main process.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mltrainer.config import UploadConfig
from mltrainer.manifest import FileDigest, file_digest
from mltrainer.nodes import NodeReports
from mltrainer.uploader import UploadError, retry, stop_worker

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class NodeJob:
    snapshot: Path  # hard links of this node's files of the checkpoint; deleted once stored
    local_checkpoint: Path  # the Trainer's folder, named in error messages
    store_path: str
    files: list[str]  # relative paths this node stores


class NodeFilesUploader:
    def __init__(self, store, reports: NodeReports, node: int, *, queue_size: int = UploadConfig.queue_size,
                 max_retries: int = UploadConfig.max_retries,
                 backoff_seconds: float = UploadConfig.backoff_seconds):
        self.store = store
        self.reports = reports
        self.node = node
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._failures: list[tuple[str, Path, BaseException]] = []
        self._reported = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="node-files-uploader", daemon=True)
        self._thread.start()

    def submit(self, job: NodeJob) -> None:
        with self._lock:
            failures, fresh = list(self._failures), len(self._failures) > self._reported
            self._reported = len(self._failures)
        if fresh:
            raise UploadError(failures)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            started = time.monotonic()
            logger.warning("node %d: upload queue full (%d pending): training waits for %s", self.node,
                           self._queue.qsize(), job.store_path)
            self._queue.put(job)
            logger.warning("node %d: training waited %.2fs for the upload queue", self.node,
                           time.monotonic() - started)

    def close(self) -> None:
        """Store what is queued, stop the worker, raise every failure."""
        stop_worker(self._queue, self._thread, _STOP, self._lock, self._failures)

    def end_after_error(self, error: BaseException) -> None:
        """Training ended with ``error``: queued files are still stored (a crash resumes from
        what is complete), except after Ctrl-C; what is not stored is logged. Never raises."""
        if isinstance(error, KeyboardInterrupt):
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    self._fail(item, RuntimeError("not attempted: training was interrupted"))
                self._queue.task_done()
        self._queue.put(_STOP)
        self._thread.join()
        with self._lock:
            for path, local, _ in self._failures:
                logger.error("node %d's files of checkpoint %s are not in the store; local copy: %s",
                             self.node, path, local)

    def _fail(self, job: NodeJob, exc: BaseException) -> None:
        with self._lock:
            self._failures.append((job.store_path, job.local_checkpoint, exc))
        try:
            self.reports.failed(job.store_path, self.node, f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the main process then times out on this checkpoint
            logger.exception("could not tell the main process that %s failed", job.store_path)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                try:
                    self.reports.stored(job.store_path, self.node, self._store(job))
                    shutil.rmtree(job.snapshot, ignore_errors=True)
                except BaseException as exc:  # noqa: BLE001 - reported to the training thread and the main process
                    logger.error("node %d: files of checkpoint %s not stored: %s", self.node, job.store_path, exc)
                    self._fail(job, exc)
            finally:
                self._queue.task_done()

    def _store(self, job: NodeJob) -> dict[str, FileDigest]:
        digests = {}
        for rel in job.files:
            local = job.snapshot / rel
            parent = os.path.dirname(f"{job.store_path}/{rel}")
            retry(f"upload of {job.store_path}/{rel}", lambda: self.store.log_artifact(str(local), parent),
                  self.max_retries, self.backoff_seconds)
            digests[rel] = file_digest(local)
        logger.info("node %d stored its %d file(s) of checkpoint %s", self.node, len(digests), job.store_path)
        return digests
