"""One trial: an ordinary train() run, created as a child of the sweep's parent run.

It runs in this process for optuna and in a Ray worker for ray, so all it needs travels in a
picklable :class:`TrialJob`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltrainer.config import TrainConfig, build_config, set_dotted

from .tags import TAG_SWEEP_NAME, TAG_TRIAL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialJob:
    """Everything a trial needs, picklable (shipped to Ray workers)."""
    sweep_name: str
    base_data: dict[str, Any]
    config_dir: str
    parent_run_id: str
    experiment_id: str
    metric: str
    keys: tuple[str, ...]


class MetricMissing(RuntimeError):
    pass


def trial_config(job: TrialJob, values: Mapping[str, Any], suffix: str) -> TrainConfig:
    data = copy.deepcopy(job.base_data)
    for key, value in values.items():
        set_dotted(data, key, value)
    experiment = data.setdefault("experiment", {})
    template = experiment.get("run_name") or "{model}-{task}"
    experiment["run_name"] = f"{template}{suffix}"
    return build_config(data, config_dir=Path(job.config_dir))


def find_child_run(client, experiment_id: str, parent_run_id: str, tag: str, value: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND tags.`{tag}` = '{value}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_chosen_values(client, run_id: str, values: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(f"trial.{k}", json.dumps(v) if isinstance(v, (bool, type(None))) else str(v))
                                     for k, v in values.items()])


def run_trial(job: TrialJob, number: int, values: Mapping[str, Any],
              extra_tags: Mapping[str, str] | None = None) -> tuple[float, str]:
    """Train one trial as a child run; returns (metric value, run id). Raises when the trial fails.

    ``extra_tags`` go on the run when it is created (the ray backend's node id), so a trial that
    dies with its machine still says where it ran.
    """
    from mlflow.tracking import MlflowClient

    from mltrainer.train import train

    client = MlflowClient()
    logger.info("trial %d: %s", number, ", ".join(f"{k}={v!r}" for k, v in values.items()))
    cfg = trial_config(job, values, f"-trial-{number}")
    try:
        result = train(cfg, parent_run_id=job.parent_run_id,
                       extra_tags={**(extra_tags or {}), TAG_TRIAL: str(number),
                                   TAG_SWEEP_NAME: job.sweep_name})
    except BaseException:
        try:
            if run_id := find_child_run(client, job.experiment_id, job.parent_run_id, TAG_TRIAL, str(number)):
                log_chosen_values(client, run_id, values)
        except Exception:  # noqa: BLE001 - the training error matters more
            logger.warning("could not log the values of failed trial %d", number, exc_info=True)
        raise
    log_chosen_values(client, result.run_id, values)
    if job.metric not in result.metrics:
        raise MetricMissing(f"trial {number} (run {result.run_id}) did not log {job.metric!r}; "
                            f"it logged: {', '.join(sorted(result.metrics)) or 'nothing'}")
    return float(result.metrics[job.metric]), result.run_id
