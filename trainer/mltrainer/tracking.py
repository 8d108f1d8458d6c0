"""The MLflow side of a training run: creating it, params, tags, versions, metrics, the final model.

Everything here runs on rank 0 only. Params are flattened, scrubbed of secrets and cut to MLflow's
limits with a visible marker; the full (scrubbed) config is logged as an artifact. The run's name
and tags go through the same scrubber (mltrainer.redaction).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mltrainer import server_probe
from mltrainer.config import TrainConfig, config_hash
from mltrainer.errors import TrackingError  # noqa: F401 - raised by callers as tracking.TrackingError
from mltrainer.params import flatten, truncate_values
from mltrainer.redaction import Scrubber

logger = logging.getLogger(__name__)

TAG_LATEST = "checkpoint.latest"
TAG_BEST = "checkpoint.best"
TAG_CONFIG_HASH = "mltrainer.config_hash"
TAG_MODEL = "mltrainer.model"
TAG_TASK = "mltrainer.task"
TAG_DATASET = "mltrainer.dataset"
MAX_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch
MLFLOW_MAX_TAG_VALUE = 8000


def client_for(cfg: TrainConfig) -> MlflowClient:
    """The client of the server ``cfg`` tracks to: ``tracking.uri`` when the config names one,
    else MLflow's default (MLFLOW_TRACKING_URI). The one place the config's URI takes effect.

    The URI also becomes MLflow's process default (``mlflow.set_tracking_uri``): the fluent calls
    that log and register the final model use it, and so do Ray trial processes, which inherit it.
    """
    if cfg.tracking.uri:
        mlflow.set_tracking_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=cfg.tracking.uri)


def check_server(client: MlflowClient) -> None:
    """Fail before any work when ``client``'s server is unreachable or the credentials are wrong
    (TrackingError naming its URI); see server_probe for how, without touching MLflow's settings."""
    server_probe.check_server(client.tracking_uri)


def dataset_name(cfg: TrainConfig) -> str:
    if cfg.data.hub is not None:
        return cfg.data.hub.name + (f"/{cfg.data.hub.config}" if cfg.data.hub.config else "")
    return Path(cfg.data.files.train).name


# The trainer image has no .git: its build bakes the commit it was built from in here.
GIT_COMMIT_ENV = "MLTRAINER_GIT_COMMIT"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(GIT_COMMIT_ENV) or None


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mlflow": mlflow.__version__,
        "cuda": torch.version.cuda or "none",
    }
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


# What MLflow's UI files an experiment under: fine-tunes are model development, not GenAI apps.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if it does not exist yet.

    Two trainers starting a new experiment at once both see it missing and both create it; the
    server refuses the second (RESOURCE_ALREADY_EXISTS, with the database's error and SQL text in
    its message), which just means the other one won: read it back instead.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = client.get_experiment_by_name(name)
    if experiment is None:  # created and deleted again in between: nothing sensible to join
        raise TrackingError(f"experiment {name!r} was created by another client and is gone again")
    return experiment.experiment_id


def create_run(client: MlflowClient, cfg: TrainConfig, run_name: str, *, parent_run_id: str | None = None,
               extra_tags: dict[str, str] | None = None) -> str:
    experiment_id = get_or_create_experiment(client, cfg.experiment.name)
    tags = {
        TAG_MODEL: cfg.model.name_or_path,
        TAG_TASK: cfg.model.task,
        TAG_DATASET: dataset_name(cfg),
        TAG_CONFIG_HASH: config_hash(cfg),
        **{f"versions.{k}": v for k, v in library_versions().items()},
        **cfg.experiment.tags,
        **(extra_tags or {}),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return open_run(client, experiment_id, run_name, tags, cfg.scrubber())


def open_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str],
             scrubber: Scrubber) -> str:
    """Create a run with its name and tags scrubbed of secrets; every run mltrainer makes starts here
    (trainings, sweep and cross-validation parents).

    MLflow's run context comes first, as ``mlflow.start_run`` would add it (``client.create_run``
    does not): ``mlflow.user``, the MLflow user we authenticate as (MLFLOW_TRACKING_USERNAME, else
    the OS user), is what the UI shows as "Created by" and what the run's user_id is taken from;
    also the source file and git details. Our tags win where both name one.
    """
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags(tags)
    # Tag values over MLflow's 8000 characters make create_run fail outright (a database error);
    # cut them with the same visible marker as params (the full value is in config/config.yaml).
    tags, cut = truncate_values(scrubber.flat(tags), limit=MLFLOW_MAX_TAG_VALUE)
    if cut:
        logger.warning("tag values cut to MLflow's limit (full config in config/config.yaml): %s", ", ".join(cut))
    # cfg.run_name() is scrubbed already; a name from elsewhere is stored (and tagged) too.
    run = client.create_run(experiment_id, run_name=scrubber.text(run_name), tags=tags)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, groups: dict[str, dict[str, Any]], scrubber: Scrubber) -> list[str]:
    """Log each group scrubbed and flattened under its prefix; returns the keys whose values were cut."""
    flat: dict[str, str] = {}
    for prefix, values in groups.items():
        # Scrubbed before flattening: a secret-named key hides its whole nested value.
        flat.update(flatten(scrubber.tree(values), prefix=prefix))
    return log_flat_params(client, run_id, flat, scrubber)


def log_flat_params(client: MlflowClient, run_id: str, flat: dict[str, str], scrubber: Scrubber) -> list[str]:
    """Log ready-made ``key -> str`` params, scrubbed and cut to MLflow's limits; returns the keys cut."""
    flat, cut = truncate_values(scrubber.flat(flat))
    params = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(params), MAX_BATCH):
        client.log_batch(run_id, params=params[i:i + MAX_BATCH])
    if cut:
        logger.warning("param values cut to MLflow's limit (full config in config/config.yaml): %s", ", ".join(cut))
    return cut


def log_config_artifact(client: MlflowClient, run_id: str, cfg: TrainConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.scrubber().tree(cfg.to_dict()), sort_keys=False))
        client.log_artifact(run_id, str(path), "config")


def log_text_file(client: MlflowClient, run_id: str, source: Path, artifact_dir: str, scrubber: Scrubber) -> None:
    """Log a text file (a sweep file, say) under its own name, scrubbed of secrets."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(source).name
        path.write_text(scrubber.text(Path(source).read_text()))
        client.log_artifact(run_id, str(path), artifact_dir)


def numeric_metrics(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def buffer_metrics(seconds: int) -> None:
    """Have MLflow's async logger send what queued up over ``seconds`` as one request (0: each call)."""
    if seconds > 0:
        os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = str(seconds)
    else:
        os.environ.pop("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", None)


def flush_metrics() -> None:
    """Block until every metric logged so far is stored."""
    mlflow.flush_async_logging()


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> int:
    """Asynchronous: the training loop never waits on this HTTP call. Returns the timestamp (ms)
    the points carry (a checkpoint's model links them again with it: checkpoint_models)."""
    ts = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()], synchronous=False)
    return ts


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def final_model_uri(client: MlflowClient, run_id: str) -> str | None:
    """The URI of the final model the run logged (see :func:`log_final_model`), if complete."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'model'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


def log_final_model(run_id: str, model, tokenizer, task: str, registered: Any | None, step: int) -> str:
    """Log the trained model as an MLflow model at ``step`` (the last global step), with the run's
    final metrics linked to it; register it under an alias when configured."""
    from mltrainer.model_metrics import link_final_metrics

    pipeline_task = "text-classification" if task == "sequence-classification" else "text-generation"
    # No second system-metrics monitor (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING): train() runs ours.
    with mlflow.start_run(run_id=run_id, nested=False, log_system_metrics=False):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task=pipeline_task,
            step=step,
            # Pinned explicitly: inferring them imports optional packages (torchvision) we don't ship.
            pip_requirements=[f"{name}=={version}" for name, version in _model_requirements().items()],
        )
    link_final_metrics(MlflowClient(), run_id, info.model_id)
    if registered is not None:
        client = MlflowClient()
        version = mlflow.register_model(info.model_uri, registered.name)
        client.set_registered_model_alias(registered.name, registered.alias, version.version)
        logger.info("registered %s version %s as @%s", registered.name, version.version, registered.alias)
    return info.model_uri


def _model_requirements() -> dict[str, str]:
    import torch
    import transformers

    return {"mlflow": mlflow.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0]}
