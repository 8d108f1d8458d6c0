"""The best checkpoint by a metric across an experiment's runs (or a sweep's trials), and registering it.

    mltrainer best --checkpoints --experiment NAME --metric eval_loss --mode min [--top 5]
                   [--parent-run RUN_ID] [--register MODEL_NAME --alias champion]

A run's best checkpoint can beat every run's final model (a run that overfits ends worse than it
was). Each complete checkpoint is a LoggedModel of model type ``checkpoint`` with the metrics of
its step linked to it (checkpoint_models), so the server ranks them: ``search_logged_models``
ordered by the metric, checkpoints without it left out. ``--parent-run`` keeps the checkpoints of
that run's children (a sweep's trials, a cross-validation's folds).

``--register`` creates a model version whose source is the checkpoint's folder in its run's
artifacts (``runs:/<run id>/<store path>``), so ``mlflow artifacts download -u
models:/NAME@ALIAS`` gives a folder ``from_pretrained`` loads. It is not an MLflow-format model
(no MLmodel file: ``mlflow.pyfunc.load_model`` cannot load it); the version's tags name the
checkpoint's model id and step. A checkpoint evicted later is gone from the store, and so is what
its version points at: register the ones to keep beyond retention under ``upload``/``save_top_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mltrainer.best import RegistryError, SelectionError, _first_line
from mltrainer.checkpoint_models import MODEL_TYPE, PARAM_STORE_PATH

TAG_MODEL_ID = "mltrainer.checkpoint.model_id"
TAG_STEP = "mltrainer.checkpoint.step"
PAGE_SIZE = 100


@dataclass
class RankedCheckpoint:
    model_id: str
    run_id: str
    store_path: str
    step: int
    value: float


def rank_checkpoints(client, experiment: str, metric: str, mode: str, top: int = 5,
                     parent_run: str | None = None) -> list[RankedCheckpoint]:
    """The ``top`` checkpoints of ``experiment`` by ``metric``, best first."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SelectionError(f"experiment {experiment!r} does not exist (or you cannot read it)")
    runs = None
    if parent_run is not None:
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run}'")
        runs = {r.info.run_id for r in children}
        if not runs:
            raise SelectionError(f"run {parent_run!r} has no child runs in experiment {experiment!r}")
    order = [{"field_name": f"metrics.{metric}", "ascending": mode == "min"}]
    found, token = [], None
    try:
        while len(found) < top:
            page = client.search_logged_models([exp.experiment_id], filter_string=f"model_type = '{MODEL_TYPE}'",
                                               order_by=order, max_results=PAGE_SIZE, page_token=token)
            for model in page:
                value = _metric(model, metric)
                if value is None or (runs is not None and model.source_run_id not in runs):
                    continue
                found.append(RankedCheckpoint(model.model_id, model.source_run_id, model.params[PARAM_STORE_PATH],
                                              int(model.params["step"]), value))
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        raise RegistryError(f"searching the checkpoints of experiment {experiment!r} failed: {_first_line(exc)}") \
            from None
    if not found:
        raise SelectionError(f"no checkpoint in experiment {experiment!r} has the metric {metric!r}")
    # The server orders; models without the metric come last and were skipped. Ties: earlier step.
    return sorted(found, key=lambda c: (c.value if mode == "min" else -c.value, c.step))[:top]


def _metric(model, key: str) -> float | None:
    values = [m for m in model.metrics or [] if m.key == key]
    return max(values, key=lambda m: m.step).value if values else None


def format_checkpoints(ranked: list[RankedCheckpoint], metric: str) -> str:
    header = ["rank", "run id", "step", metric, "checkpoint"]
    rows = [[str(i + 1), c.run_id, str(c.step), f"{c.value:.6g}", c.store_path] for i, c in enumerate(ranked)]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows])


def register_checkpoint(client, best: RankedCheckpoint, name: str, alias: str) -> str:
    """A new version of ``name`` whose source is ``best``'s folder; ``alias`` points at it. Returns the version."""
    from mlflow.exceptions import MlflowException

    source = f"runs:/{best.run_id}/{best.store_path}"
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source, run_id=best.run_id,
                                              tags={TAG_MODEL_ID: best.model_id, TAG_STEP: str(best.step)})
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise RegistryError(f"registering {source} as {name!r} failed: {_first_line(exc)}") from None
    return str(version.version)
