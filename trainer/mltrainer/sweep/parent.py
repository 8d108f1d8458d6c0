"""The sweep's parent run: created with the search it records, then the trials' aggregates.

Both backends report their trials as :class:`TrialRecord` and end in :func:`summarize` and
:func:`finish_parent`, so a sweep's parent looks the same whichever backend ran it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import LoadedSweep, SweepSpec
from .tags import TAG_BEST_NUMBER, TAG_BEST_RUN, TAG_SWEEP, TAG_SWEEP_NAME, TAG_SWEEP_STATE

logger = logging.getLogger(__name__)


@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE | FAIL
    values: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    run_id: str | None = None
    error: str | None = None


@dataclass
class SweepOutcome:
    parent_run_id: str
    records: list[TrialRecord]
    complete: bool  # all requested trials have run
    best: TrialRecord | None


def create_parent(client, loaded: LoadedSweep, experiment_id: str) -> str:
    from mltrainer import tracking

    spec = loaded.spec
    tags = {TAG_SWEEP: "true", TAG_SWEEP_NAME: spec.name, "mltrainer.sweep.backend": spec.backend,
            TAG_SWEEP_STATE: "running", **loaded.base_cfg.experiment.tags}
    if commit := tracking.git_commit():
        tags["mlflow.source.git.commit"] = commit
    # The base config's secrets (and the environment's) are taken out of all the parent stores,
    # the sweep file included: its overrides may set them.
    scrubber = loaded.base_cfg.scrubber()
    run_id = tracking.open_run(client, experiment_id, f"{spec.name}-sweep", tags, scrubber)
    params = {
        "search.algorithm": {"tpe": "TPE", "random": "random", "grid": "grid"}[spec.algorithm],
        "search.backend": spec.backend,
        "search.space": spec.space_json(),
        "search.trials": str(spec.trials),
        "search.metric": spec.metric,
        "search.direction": spec.direction,
        "search.parallel": str(spec.parallel),
        "search.seed": str(spec.seed),
        "sweep.name": spec.name,
        "sweep.base_config": spec.base,
        "sweep.overrides": json.dumps(list(spec.overrides)),
    }
    tracking.log_flat_params(client, run_id, params, scrubber)
    tracking.log_text_file(client, run_id, Path(spec.path), "sweep", scrubber)
    return run_id


def best_of(spec: SweepSpec, records: Sequence[TrialRecord]) -> TrialRecord | None:
    best = None
    for r in records:
        if r.state == "COMPLETE" and r.value is not None and not math.isnan(r.value):
            if best is None or spec.better(r.value, best.value):
                best = r
    return best


def summarize(client, spec: SweepSpec, parent_run_id: str, records: list[TrialRecord], *,
              complete: bool, importances: Mapping[str, float] | None, importance_method: str) -> TrialRecord | None:
    """Log the aggregates on the parent: best value/run/values, per-trial values, counts, plots."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    from mltrainer import plots

    best = best_of(spec, records)
    now = int(time.time() * 1000)
    per_trial = f"trial_{spec.metric}"
    logged_steps = {m.step for m in client.get_metric_history(parent_run_id, per_trial)}
    metrics = [Metric(per_trial, r.value, now, r.number) for r in records
               if r.state == "COMPLETE" and r.value is not None and r.number not in logged_steps]
    metrics += [Metric("trials_complete", sum(r.state == "COMPLETE" for r in records), now, 0),
                Metric("trials_failed", sum(r.state != "COMPLETE" for r in records), now, 0)]
    tags = [RunTag(TAG_SWEEP_STATE, "complete" if complete else "incomplete")]
    params = []
    if best is not None:
        metrics.append(Metric(f"best_{spec.metric}", best.value, now, 0))
        tags += [RunTag(TAG_BEST_RUN, best.run_id or ""), RunTag(TAG_BEST_NUMBER, str(best.number))]
        tags += [RunTag(f"best.{k}", str(v)) for k, v in best.values.items()]
        if complete:  # params are immutable: only once the sweep is over
            existing = client.get_run(parent_run_id).data.params
            for k, v in best.values.items():
                if f"best.{k}" not in existing:
                    params.append(Param(f"best.{k}", str(v)))
                elif existing[f"best.{k}"] != str(v):
                    logger.warning("param best.%s already logged as %s (tag best.%s has the current best)",
                                   k, existing[f"best.{k}"], k)
            if "best.trial_number" not in existing:
                params.append(Param("best.trial_number", str(best.number)))
    client.log_batch(parent_run_id, metrics=metrics, params=params, tags=tags)
    try:
        plots.log_metric_by_trial(client, parent_run_id,
                                  [(r.number, r.value) for r in records if r.state == "COMPLETE" and r.value is not None],
                                  spec.metric, spec.direction, [r.number for r in records if r.state != "COMPLETE"])
        if importances:
            plots.log_param_importance(client, parent_run_id, importances, importance_method)
    except Exception:  # noqa: BLE001
        logger.warning("could not plot the sweep summary", exc_info=True)
    return best


def finish_parent(client, parent_run_id: str, complete: bool, any_complete: bool) -> None:
    if complete:
        client.set_terminated(parent_run_id, "FINISHED" if any_complete else "FAILED")
    else:
        client.set_terminated(parent_run_id, "KILLED")  # resumable: the same command continues it


def safe_terminate(client, run_id: str, status: str) -> None:
    """Mark the parent run ``status`` on the way out of an error: the original error matters more."""
    try:
        client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001
        logger.warning("could not mark the parent run %s %s", run_id, status, exc_info=True)
