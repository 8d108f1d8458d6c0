"""Programmatic best-run selection: rank an experiment's runs by a metric, optionally register the best.

    mltrainer best --experiment NAME --metric eval_f1 --mode max [--filter "params.x = '1'"] [--top 5]
                   [--register MODEL_NAME --alias champion] [--all-statuses]

Runs are searched with MLflow's own filter syntax (``--filter``), ordered by the metric; runs
without the metric are left out, and so are unfinished or failed runs unless ``--all-statuses``.
The table shows run id, run name, the metric and only the params whose values differ among the
listed runs. ``--register`` registers the best run's logged model (the one ``train`` logs as
``model``) and points the alias at the new version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mltrainer.checkpoint_models import MODEL_TYPE
from mltrainer.errors import EXIT_CONFIG, EXIT_TRACKING, MltrainerError

logger = logging.getLogger(__name__)


class SelectionError(MltrainerError):
    """Bad user input (unknown experiment, invalid filter, nothing matching)."""

    exit_code = EXIT_CONFIG
    label = "error"


class RegistryError(MltrainerError):
    """The tracking server refused or failed an operation."""

    exit_code = EXIT_TRACKING
    label = "tracking error"


@dataclass
class Ranked:
    runs: list  # mlflow Run objects, best first
    metric: str
    differing: list[str]  # param keys whose values differ among ``runs``


def rank_runs(client, experiment: str, metric: str, mode: str, filter_string: str = "", top: int = 5,
              all_statuses: bool = False) -> Ranked:
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        raise RegistryError(f"could not look up experiment {experiment!r}: {exc}") from None
    if exp is None:
        raise SelectionError(f"experiment {experiment!r} does not exist (or you cannot read it)")
    order = "DESC" if mode == "max" else "ASC"
    runs, token = [], None
    try:
        while len(runs) < top:
            page = client.search_runs([exp.experiment_id], filter_string=filter_string or "",
                                      order_by=[f"metrics.`{metric}` {order}"], max_results=max(top * 4, 50),
                                      page_token=token)
            for run in page:
                value = run.data.metrics.get(metric)
                if value is None or math.isnan(value):
                    continue
                if not all_statuses and run.info.status != "FINISHED":
                    continue
                runs.append(run)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        if _is_bad_request(exc):
            raise SelectionError(f"invalid filter string {filter_string!r}: {_first_line(exc)}") from None
        raise RegistryError(f"searching runs of experiment {experiment!r} failed: {_first_line(exc)}") from None
    runs = runs[:top]
    return Ranked(runs, metric, differing_params(runs))


def _is_bad_request(exc) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def _first_line(exc) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def differing_params(runs: Sequence) -> list[str]:
    keys = sorted({k for run in runs for k in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def _cell(value, width: int = 40) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(ranked: Ranked) -> str:
    header = ["rank", "run id", "run name", ranked.metric, *ranked.differing]
    rows = [[str(i + 1), run.info.run_id, _cell(run.info.run_name, 32), f"{run.data.metrics[ranked.metric]:.6g}",
             *(_cell(run.data.params.get(k), 24) for k in ranked.differing)] for i, run in enumerate(ranked.runs)]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows])


def find_logged_model_uri(client, run) -> str:
    """The URI of the run's final model (``train`` logs it as ``model``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    try:
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id='{run_id}'", output_format="list")
    except MlflowException as exc:
        raise RegistryError(f"could not search the logged models of run {run_id}: {_first_line(exc)}") from None
    # Not a checkpoint's model (checkpoint_models): those are folders, registered by best --checkpoints.
    models = [m for m in models if getattr(m, "model_type", None) != MODEL_TYPE]
    models = [m for m in models if getattr(m, "name", None) == "model"] or models
    if models:
        newest = max(models, key=lambda m: getattr(m, "creation_timestamp", 0) or 0)
        return newest.model_uri
    raise SelectionError(f"run {run_id} has no logged model to register (did its training finish?)")


def register_best(client, run, name: str, alias: str) -> tuple[str, str]:
    """Register ``run``'s final model as ``name`` and set ``alias``; returns (version, model uri)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = find_logged_model_uri(client, run)
    try:
        version = mlflow.register_model(uri, name)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise RegistryError(f"registering {uri} as {name!r} failed: {_first_line(exc)}") from None
    return str(version.version), uri
