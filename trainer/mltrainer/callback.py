"""The Trainer callback: stepped metrics, and every checkpoint into the store under a unique name.

It never renames or moves the Trainer's folders (that breaks rotation and resume); it takes a
hard-linked snapshot and hands it to the background uploader.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mltrainer import tracking
from mltrainer.lease import LeaseKeeper
from mltrainer.limits import NameTooLongError
from mltrainer.monitor import MonitorWatch
from mltrainer.naming import DEFAULT_PATH_TEMPLATE, checkpoint_store_path
from mltrainer.node_upload import NodeFilesUploader, NodeJob
from mltrainer.nodes import NodeGroup, OtherNodesFiles
from mltrainer.policy import CheckpointPolicy
from mltrainer.uploader import CheckpointUploader, UploadJob

logger = logging.getLogger(__name__)


# Under the run's local folder: one snapshot per save while its upload is pending (see snapshot).
SNAPSHOT_DIR = ".upload-snapshots"


def snapshot(src: Path, dst: Path, only: list[str] | None = None) -> Path:
    """Hard-link every file of ``src`` (or the relative paths ``only``) into ``dst`` (copy when
    links are impossible).

    A save writes a fresh checkpoint folder, so a link keeps the bytes of this save alive for the
    upload even after rotation deletes ``src``. A ``dst`` already there can only be a dead process's
    (each step is saved once per process): it is replaced, never merged into this save.
    """
    if dst.exists():
        shutil.rmtree(dst)
    if only is None:
        only = [str((Path(root) / name).relative_to(src)) for root, _dirs, files in os.walk(src) for name in files]
    dst.mkdir(parents=True, exist_ok=True)
    for rel in only:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst / rel)
        except OSError:
            shutil.copy2(src / rel, dst / rel)
    return dst


class ReachedMaxSteps(Exception):
    """Training would start at or past ``max_steps``: the checkpoint resumed from is the last one.

    The Trainer itself runs one more step in that case (it checks ``max_steps`` only after a
    step), which logs a step past the end and stores a checkpoint no run should have.
    """


class StoreCheckpointsCallback(TrainerCallback):
    def __init__(self, *, client, run_id: str, policy: CheckpointPolicy, uploader: CheckpointUploader | None,
                 snapshot_root: Path, is_main: bool, already_logged: dict[str, int] | None = None,
                 lease: LeaseKeeper | None = None, nodes: NodeGroup | None = None,
                 node_uploader: NodeFilesUploader | None = None):
        self.client = client
        # Several processes (torchrun): every save is shared out among the nodes (mltrainer.nodes);
        # ``node_uploader`` stores this node's share on a node other than the main process's.
        self.nodes = nodes
        self.node_uploader = node_uploader
        self.run_id = run_id
        self.policy = policy
        self.uploader = uploader
        self.snapshot_root = snapshot_root
        self.is_main = is_main
        self._metrics_by_step: dict[int, dict[str, float]] = {}
        self._logged_at: dict[int, dict[str, int]] = {}  # step -> metric key -> timestamp this process logged
        # After a resume, steps between the checkpoint and the crash were logged already: log
        # each (metric, step) once, so the history has no duplicates.
        self._already_logged = already_logged or {}
        self._first_step_logged = False
        self.lease = lease
        # A resumed run whose store already holds a checkpoint ranked by the monitor has seen it.
        ranked = uploader is not None and uploader.retention.best(policy) is not None
        self.monitor_watch = MonitorWatch(policy.monitor, seen=ranked)

    def on_train_begin(self, args, state, control, **kwargs):
        # Every rank sees the same state here, so under torchrun all of them stop together.
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise ReachedMaxSteps(f"step {state.global_step} is already max_steps ({state.max_steps})")

    def on_step_begin(self, args, state, control, **kwargs):
        # A fixed marker of "training really runs" (after any resume download and Trainer setup):
        # bench/ measures resume latency up to this line.
        if not self._first_step_logged:
            self._first_step_logged = True
            logger.info("first training step started (step %d)", state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.lease is not None:
            self.lease.check()  # another process took the run over: stop before logging or saving

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not self.is_main or not logs:
            return
        step = state.global_step
        metrics = tracking.numeric_metrics(logs)
        self._metrics_by_step.setdefault(step, {}).update(metrics)
        fresh = {k: v for k, v in metrics.items() if step > self._already_logged.get(k, -1)}
        ts = tracking.log_metrics(self.client, self.run_id, fresh, step)
        self._logged_at.setdefault(step, {}).update(dict.fromkeys(fresh, ts))

    def metrics_at(self, step: int) -> dict[str, float]:
        return dict(self._metrics_by_step.get(step, {}))

    def logged_at(self, step: int) -> dict[str, int]:
        """Metric key -> timestamp (ms) of the points this process logged at ``step``."""
        return dict(self._logged_at.get(step, {}))

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        store_path = self._store_path(args, state, local) if self.is_main and self.uploader is not None else None
        if self.nodes is None:
            if store_path is not None:
                self._submit(local, store_path, state)
            return
        # Every rank, in the same order: which files of this save each node stores.
        share = self.nodes.share_checkpoint(local, store_path)
        if share is None:
            return
        me = self.nodes.topology
        if self.is_main:
            others = {node: files for node, files in share.files.items() if node != me.node}
            self._submit(local, store_path, state, only=share.files.get(me.node, []),
                         other_nodes=OtherNodesFiles(store_path, others, self.nodes.reports))
        elif self.node_uploader is not None and (mine := share.files.get(me.node)):
            snap = snapshot(local, self.snapshot_root / f"step-{step}", only=mine)
            self.node_uploader.submit(NodeJob(snap, local, share.store_path, mine))

    def _store_path(self, args, state, local: Path) -> str | None:
        """Where this save goes in the store, or None when the policy keeps it local only."""
        step = state.global_step
        metrics = self.metrics_at(step)
        is_final = state.max_steps > 0 and step >= state.max_steps
        self.monitor_watch.at_save(step, metrics)
        if not self.uploader.retention.should_upload(self.policy, step, is_final, metrics):
            return None
        if not local.is_dir():
            logger.warning("no checkpoint folder at %s after a save; nothing to upload", local)
            return None
        try:
            return checkpoint_store_path(self.policy.path_template, step=step, epoch=state.epoch, metrics=metrics)
        except NameTooLongError as exc:
            # A metric beyond what the config check assumed (a loss of 1e300 under {eval_loss:.4f}):
            # the store could not read that name back, and a checkpoint is never dropped.
            store_path = checkpoint_store_path(DEFAULT_PATH_TEMPLATE, step=step)
            logger.warning("%s; this checkpoint is stored as %s instead", exc, store_path)
            return store_path

    def _submit(self, local: Path, store_path: str, state, only: list[str] | None = None,
                other_nodes: OtherNodesFiles | None = None) -> None:
        step = state.global_step
        # Metrics are sent in buffered batches: get those up to this step stored before the
        # checkpoint can become complete, or a crash could leave a resumable checkpoint whose
        # last steps are missing from the history for good (resume does not redo them).
        tracking.flush_metrics()
        snap = snapshot(local, self.snapshot_root / f"step-{step}", only=only)
        waited = self.uploader.submit(UploadJob(snap, local, store_path, step, self.metrics_at(step),
                                                other_nodes=other_nodes))
        if waited > 0:
            tracking.log_metrics(self.client, self.run_id, {"upload_wait_seconds": waited}, step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.is_main and self.uploader is not None:
            self.uploader.close(progress=True)
        if self.node_uploader is not None:
            self.node_uploader.close()
