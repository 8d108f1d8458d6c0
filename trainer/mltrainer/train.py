"""One training run: config -> MLflow run -> Trainer with our callback -> final model.

Order matters: everything that can be wrong with the input (config, TrainingArguments values,
the tracking server, credentials) is checked before the MLflow run is created.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mltrainer import plots, system_metrics, tracking
from mltrainer.config import TrainConfig
from mltrainer.data_inputs import log_data_inputs
from mltrainer.errors import ConfigError
from mltrainer.naming import run_dir_name

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    global_step: int
    model_uri: str | None
    metrics: dict[str, float]  # the last value of every metric the Trainer logged (eval_* included)
    policy_problem: str | None = None  # checkpoints.monitor never appeared at a save (monitor.py)


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """Last value of each numeric metric in the Trainer's log history."""
    out: dict[str, float] = {}
    for entry in log_history:
        out.update(tracking.numeric_metrics({k: v for k, v in entry.items() if k not in ("step", "epoch")}))
    return out


def build_training_arguments(cfg: TrainConfig):
    """Validate the pass-through values now; the real output directory is set once the run exists.

    The arguments pickle without secrets: they become training_args.bin in every checkpoint.
    """
    from mltrainer.secret_free_args import SecretFreeTrainingArguments

    kwargs = dict(cfg.training)
    # Pinned memory only speeds up copies to an accelerator; without one, torch warns once per
    # dataloader (four times in the demo) and pins nothing. An explicit value is kept.
    kwargs.setdefault("dataloader_pin_memory", _accelerator_available())
    if kwargs.pop("report_to", None) not in (None, "none", []):
        logger.warning("training.report_to ignored: tracking is done by mltrainer's own callback")
    try:
        return SecretFreeTrainingArguments.create(cfg.scrubber(), output_dir=str(Path(cfg.output_root) / ".pending"),
                                                  report_to="none", **kwargs)
    except (TypeError, ValueError) as exc:  # transformers' own check of a value we passed through
        raise ConfigError("training", str(exc)) from None


def _accelerator_available() -> bool:
    import torch

    return torch.accelerator.is_available()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def share(value):
    """All ranks train into one run: rank 0 decided ``value`` (run id, resume folder), the rest learn it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(cfg: TrainConfig, *, resume: str | None = None, resume_checkpoint: str | None = None,
          parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainResult:
    """Train per ``cfg``; with ``resume`` (a run id or ``latest``), continue that run from the store.

    ``parent_run_id`` makes the run a nested child (sweep trials, cross-validation folds).
    """
    from mltrainer.lease import LeaseKeeper
    from mltrainer.resume import ClaimInBackground, plan_resume

    client = tracking.client_for(cfg)
    main = is_main_process()
    # This process's lease on its run (rank 0 only): no second trainer may resume it meanwhile.
    lease = LeaseKeeper(client, cfg.tracking.lease_seconds) if main else None
    claiming = None
    try:
        if main and resume is not None:
            # A resume starts first: whatever refuses it does so at once, and its claim (a 2 s
            # settle) and download run beside the rest of the start: torch's import, the model, the data.
            tracking.check_server(client)
            claiming = ClaimInBackground(plan_resume(client, cfg, resume, resume_checkpoint), lease)
        args = build_training_arguments(cfg)
        _ = args.device  # initialises torch.distributed under torchrun/accelerate
        return _train(cfg, args, client, lease, main, claiming, parent_run_id, extra_tags)
    except BaseException:
        if claiming is not None:
            claiming.undo()  # a failure before the claimed run was handed to the training: give it back
        raise
    finally:
        if lease is not None:
            lease.release()


def _train(cfg: TrainConfig, args, client, lease, main: bool, claiming, parent_run_id: str | None,
           extra_tags: dict[str, str] | None) -> TrainResult:
    from transformers import Trainer

    from mltrainer.callback import ReachedMaxSteps
    from mltrainer.lease import RunInUseError
    from mltrainer.modeling import prepare
    from mltrainer.pipeline import build_checkpoint_pipeline

    if main and claiming is None:
        tracking.check_server(client)
    # Seed before the model is built: a model made from a config gets the same initial weights
    # every time, so two runs of one config are comparable (and a resume matches a straight run).
    from transformers import set_seed

    set_seed(args.seed)
    prepared = prepare(cfg)  # before the run: a bad dataset or model path must not leave a run behind
    point = claiming.result() if claiming is not None else None
    run_id = run_name = None
    if main:
        if point is not None:
            run_id, run_name = point.run_id, point.run_name
        else:
            run_name = cfg.run_name()
            run_id = tracking.create_run(client, cfg, run_name, parent_run_id=parent_run_id,
                                         extra_tags={**(extra_tags or {}), **lease.initial_tags()})
            lease.hold(run_id)
    run_id, run_name, resume_from = share((run_id, run_name, point.checkpoint.to_json() if point else None))
    run_dir = Path(cfg.output_root).resolve() / run_dir_name(run_name, run_id)
    args.output_dir = str(run_dir)
    # Every node needs the checkpoint on its own disk (no shared filesystem): the main process
    # downloaded it, each other node's local rank 0 fetches the same one.
    resume_dir = str(fetch_on_every_node(client, run_id, run_dir, point, resume_from)) if resume_from else None
    logger.info("run %s trains in %s%s", run_id, run_dir, f" (resuming from {resume_dir})" if resume_dir else "")

    uploader = node_uploader = monitor = None
    try:
        if main:
            if point is None:
                tracking.log_params(client, run_id, {
                    "config": cfg.to_dict(),
                    "model_config": prepared.model.config.to_dict(),
                    "args": args.to_dict(),
                }, cfg.scrubber())
                tracking.log_config_artifact(client, run_id, cfg)
            else:
                client.update_run(run_id, status="RUNNING")
            # Also on a resume: data changed since the crash shows as a second input.
            log_data_inputs(client, run_id, cfg, prepared.raw_train, prepared.raw_eval)
            if cfg.tracking.system_metrics:
                monitor = system_metrics.start(run_id, client.tracking_uri, resumed=point is not None)
        pipeline = build_checkpoint_pipeline(cfg, client, run_id, run_dir, is_main=main, resume=point, lease=lease)
        uploader, node_uploader, callback = pipeline.uploader, pipeline.node_uploader, pipeline.callback
        trainer = Trainer(
            model=prepared.model, args=args, train_dataset=prepared.train_dataset,
            eval_dataset=prepared.eval_dataset, data_collator=prepared.data_collator,
            processing_class=prepared.tokenizer, callbacks=[callback],
        )
        try:
            trainer.train(resume_from_checkpoint=resume_dir)
        except ReachedMaxSteps as reached:
            # The run crashed after its last step was stored (during the final upload or model
            # logging): finish what is missing, without training.
            logger.info("%s: nothing left to train; finishing run %s", reached, run_id)
            if uploader is not None:
                uploader.close(progress=False)
            if node_uploader is not None:
                node_uploader.close()
        model_uri = None
        if main:
            import mlflow

            mlflow.flush_async_logging()
            lease.check()  # a run taken over by another process is theirs to finish
            # A resumed run may have logged its final model before it crashed: never a second one.
            if point is not None and (model_uri := tracking.final_model_uri(client, run_id)):
                logger.info("run %s already has its final model %s; not logged again", run_id, model_uri)
            elif cfg.log_final_model:
                model_uri = tracking.log_final_model(run_id, trainer.model, prepared.tokenizer, cfg.model.task,
                                                     cfg.registered_model, step=trainer.state.global_step)
        result = TrainResult(run_id, run_dir, trainer.state.global_step, model_uri,
                             final_metrics(trainer.state.log_history),
                             callback.monitor_watch.problem(uploader.retention.latest()) if uploader else None)
        if main:
            # Every run that ends here, a resumed one included: curves from the run's whole history.
            plots.log_run_plots(client, cfg, result)
            system_metrics.stop(monitor)
            monitor = None
            client.set_terminated(run_id, "FINISHED")
        return result
    except BaseException as exc:
        if uploader is not None:  # queued checkpoints stored or named, the worker thread stopped
            # Not into a run another process has taken over, and not after Ctrl-C: named instead.
            uploader.end_after_error(exc, store_queued=not isinstance(exc, (KeyboardInterrupt, RunInUseError)))
        if node_uploader is not None:
            node_uploader.end_after_error(exc)
        system_metrics.stop(monitor)
        if main and isinstance(exc, RunInUseError):
            raise  # the run is someone else's now: its status is theirs to set
        if main:
            try:
                import mlflow

                mlflow.flush_async_logging()
                client.set_terminated(run_id, "KILLED" if isinstance(_current_exc(), KeyboardInterrupt) else "FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.exception("could not mark run %s as failed", run_id)
        raise


def fetch_on_every_node(client, run_id: str, run_dir: Path, point, checkpoint_json: str) -> Path:
    """The checkpoint to resume from, on this node's disk: the main process has it already
    (``point``); each other node's local rank 0 downloads it (all of it: a rank reads its own
    ``rng_state_<rank>.pth``, the weights and the optimizer state). Every rank learns whether every
    node has it before any trains, so a failed download stops all of them with one clear error.
    """
    from mltrainer.manifest import Manifest
    from mltrainer.nodes import NodeGroup
    from mltrainer.resume import ResumeError, clear_dead_trainers_leftovers, download_checkpoint
    from mltrainer.transfer import RunArtifacts

    manifest = Manifest.from_json(checkpoint_json)
    local = run_dir / f"checkpoint-{manifest.step}"
    nodes = NodeGroup.if_distributed()
    if nodes is None:
        return point.local_dir
    problem = None
    if point is None and nodes.topology.is_node_leader:
        if local.exists():
            shutil.rmtree(local)
        problem = download_checkpoint(RunArtifacts.of_run(client, run_id), manifest, local)
        if problem is None:
            clear_dead_trainers_leftovers(run_dir, manifest.step)
            logger.info("node %d has checkpoint %s in %s", nodes.topology.node, manifest.store_path, local)
    problems = nodes.gather((nodes.topology.node, problem))
    if failed := [f"node {node}: {p}" for node, p in problems if p is not None]:
        raise ResumeError(f"run {run_id}: checkpoint {manifest.store_path} could not be downloaded on every node "
                          f"({'; '.join(failed)})")
    return point.local_dir if point is not None else local


def _current_exc() -> BaseException | None:
    import sys

    return sys.exc_info()[1]
