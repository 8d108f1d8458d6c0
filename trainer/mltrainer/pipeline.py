"""The checkpoint pipeline of one run: the background uploader and the Trainer callback, wired.

Built in one place for training (train.py) and for the benchmark (bench/worker.py), so what the
benchmark measures is the product's wiring (retries, backoff, the latest/best tags and the
checkpoint's LoggedModel after every stored checkpoint, part limits), not a copy of it that drifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mltrainer import tracking
from mltrainer.callback import SNAPSHOT_DIR, StoreCheckpointsCallback
from mltrainer.checkpoint_models import CheckpointModels
from mltrainer.config import TrainConfig
from mltrainer.lease import LeaseKeeper
from mltrainer.node_upload import NodeFilesUploader
from mltrainer.nodes import NodeGroup
from mltrainer.transfer import RunArtifacts
from mltrainer.uploader import CheckpointUploader

if TYPE_CHECKING:
    from mltrainer.resume import ResumePoint


@dataclass
class CheckpointPipeline:
    callback: StoreCheckpointsCallback  # add to the Trainer's callbacks
    uploader: CheckpointUploader | None  # None on ranks other than 0: only the main process writes manifests
    # Multi-node training, on each other node's local rank 0: stores the files only that node has.
    node_uploader: NodeFilesUploader | None = None


def build_checkpoint_pipeline(cfg: TrainConfig, client, run_id: str, run_dir: Path, *, is_main: bool = True,
                              resume: ResumePoint | None = None,
                              lease: LeaseKeeper | None = None) -> CheckpointPipeline:
    """Uploader (main process only) and callback for the run ``run_id``, training into ``run_dir``.

    ``resume``: the point a resumed run continues from; the uploader adopts what is already
    stored (dedup, retention) and the callback skips metric steps already logged.
    """
    uploader = callback = None  # the callback, made below, is what models' logged_at asks
    if is_main:
        store = RunArtifacts.of_run(client, run_id)
        # Linked metrics carry the timestamps the callback logged them with (checkpoint_models).
        models = CheckpointModels(client, run_id, cfg.checkpoints, logged_at=lambda step: callback.logged_at(step))

        def on_stored(manifest, retention):
            models.stored(manifest, retention)
            tags = {tracking.TAG_LATEST: retention.latest() or ""}
            if best := retention.best(cfg.checkpoints):
                tags[tracking.TAG_BEST] = best
            tracking.set_tags(client, run_id, tags)

        uploader = CheckpointUploader(
            store, cfg.checkpoints, retention=resume.retention if resume else None,
            queue_size=cfg.upload.queue_size, max_retries=cfg.upload.max_retries,
            backoff_seconds=cfg.upload.backoff_seconds, on_stored=on_stored, on_evicting=models.evicting,
            part_limit=store.part_limit, background_parts=cfg.upload.background_parts,
        )
        if resume is not None:
            uploader.adopt(resume.manifests)
    nodes = NodeGroup.if_distributed()
    node_uploader = None
    if nodes is not None and nodes.topology.is_node_leader and not is_main:
        node_uploader = NodeFilesUploader(
            RunArtifacts.of_run(client, run_id), nodes.reports, nodes.topology.node, queue_size=cfg.upload.queue_size,
            max_retries=cfg.upload.max_retries, backoff_seconds=cfg.upload.backoff_seconds,
        )
    tracking.buffer_metrics(cfg.tracking.metrics_flush_seconds)
    callback = StoreCheckpointsCallback(
        client=client, run_id=run_id, policy=cfg.checkpoints, uploader=uploader,
        snapshot_root=run_dir / SNAPSHOT_DIR, is_main=is_main,
        already_logged=resume.logged_steps if resume else None, lease=lease,
        nodes=nodes, node_uploader=node_uploader,
    )
    if is_main and resume is not None:
        # A run stored before checkpoints were models, or one that died between a manifest and
        # its model: one model per complete checkpoint from here on.
        models.reconcile(resume.manifests, resume.retention)
    return CheckpointPipeline(callback=callback, uploader=uploader, node_uploader=node_uploader)
