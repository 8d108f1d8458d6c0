"""PNG plots logged as run artifacts under ``plots/``: loss curves, confusion matrix, sweep summaries.

Everything renders with matplotlib's Agg backend (no display needed). Plotting is best effort:
callers log a warning and go on when a plot cannot be made, a missing picture never fails a run.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
CURVES = "curves.png"
CONFUSION = "confusion_matrix.png"
METRIC_BY_TRIAL = "metric_by_trial.png"
PARAM_IMPORTANCE = "param_importance.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _log_figure(client, run_id: str, fig, filename: str) -> str:
    plt = _pyplot()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        client.log_artifact(run_id, str(path), PLOTS_DIR)
    return f"{PLOTS_DIR}/{filename}"


# --------------------------------------------------------------------------------------------
# Per run


def log_loss_curves(client, run_id: str) -> str | None:
    """Training loss and eval loss against the step, from the run's metric history."""
    series = {}
    for key in ("loss", "train_loss", "eval_loss"):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if key == "train_loss" and "loss" in series:
            continue  # the Trainer's summary value: one point, the per-step "loss" says more
        if points:
            series[key] = points
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"loss": "training loss", "train_loss": "training loss", "eval_loss": "eval loss"}
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=labels[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return _log_figure(client, run_id, fig, CURVES)


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], n: int) -> list[list[int]]:
    """``n`` x ``n`` counts; rows are the true label, columns the predicted one."""
    matrix = [[0] * n for _ in range(n)]
    for true, pred in zip(labels, predictions):
        matrix[int(true)][int(pred)] += 1
    return matrix


def log_confusion_matrix(client, run_id: str, matrix: list[list[int]], names: Sequence[str]) -> str:
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels=list(names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_title("Confusion matrix (eval set)")
    return _log_figure(client, run_id, fig, CONFUSION)


def final_model_dir(run_dir: Path, global_step: int) -> Path | None:
    """The local checkpoint holding the final weights (``checkpoint-<global_step>``), if kept."""
    candidate = Path(run_dir) / f"checkpoint-{global_step}"
    return candidate if (candidate / "config.json").is_file() else None


def predict_eval(cfg, model_dir: str | Path, tokenizer_dir: str | Path | None = None, batch_size: int = 32) -> tuple[list[int], list[int], list[str]]:
    """Labels and predictions of the model in ``model_dir`` on the config's eval split.

    Uses the label mapping stored in the model's config (``label2id``), so ids match training.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mltrainer.modeling import load_raw_datasets

    _, evaluation = load_raw_datasets(cfg)
    if evaluation is None:
        raise ValueError("no eval data")
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    model.eval()
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
    texts = evaluation[cfg.data.text_column]
    labels = [label2id[str(v)] for v in evaluation[cfg.data.label_column]]
    predictions: list[int] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], truncation=True, max_length=cfg.data.max_length,
                              padding=True, return_tensors="pt")
            predictions.extend(model(**batch).logits.argmax(-1).tolist())
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    names = [id2label.get(i, str(i)) for i in range(model.config.num_labels)]
    return labels, predictions, names


def log_run_plots(client, cfg, result) -> list[str]:
    """Curves for any run; the confusion matrix for classification with eval data. Best effort."""
    logged = []
    try:
        if path := log_loss_curves(client, result.run_id):
            logged.append(path)
    except Exception:  # noqa: BLE001 - a plot must not fail the run
        logger.warning("could not plot the loss curves of run %s", result.run_id, exc_info=True)
    if cfg.model.task == "sequence-classification" and cfg.data.has_eval:
        try:
            model_dir = final_model_dir(result.run_dir, result.global_step)
            tokenizer_dir = None
            if model_dir is None and result.model_uri:  # no local final checkpoint: the logged model
                import mlflow

                root = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=result.model_uri, dst_path=tempfile.mkdtemp(prefix="mltrainer-model-")))
                model_dir, tokenizer_dir = root / "model", root / "components" / "tokenizer"
            if model_dir is not None:
                labels, predictions, names = predict_eval(cfg, model_dir, tokenizer_dir)
                matrix = confusion_matrix(labels, predictions, len(names))
                logged.append(log_confusion_matrix(client, result.run_id, matrix, names))
        except Exception:  # noqa: BLE001
            logger.warning("could not plot the confusion matrix of run %s", result.run_id, exc_info=True)
    return logged


# --------------------------------------------------------------------------------------------
# Sweeps


def log_metric_by_trial(client, run_id: str, points: Sequence[tuple[int, float]], metric: str,
                        direction: str, failed: Sequence[int] = ()) -> str | None:
    """Each trial's value of ``metric`` against its number, with the best-so-far line."""
    if not points and not failed:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = sorted(points)
    if points:
        numbers, values = zip(*points)
        ax.scatter(numbers, values, label=metric, zorder=3)
        best, running = [], None
        for value in values:
            running = value if running is None else (min(running, value) if direction == "minimize"
                                                     else max(running, value))
            best.append(running)
        ax.step(numbers, best, where="post", color="tab:orange", label="best so far")
    if failed:
        low = min((v for _, v in points), default=0.0)
        ax.scatter(list(failed), [low] * len(failed), marker="x", color="tab:red", label="failed", zorder=3)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by trial ({direction})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _log_figure(client, run_id, fig, METRIC_BY_TRIAL)


def log_param_importance(client, run_id: str, importances: Mapping[str, float], method: str) -> str | None:
    if not importances:
        return None
    plt = _pyplot()
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(items)))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("importance")
    ax.set_title(f"Parameter importance ({method})")
    return _log_figure(client, run_id, fig, PARAM_IMPORTANCE)


def correlation_importance(records: Sequence[tuple[Mapping[str, Any], float]]) -> dict[str, float]:
    """Fallback importance: |Pearson correlation| of each parameter with the metric, normalised.

    Categorical values are encoded by their order of first appearance. Parameters that never
    vary get 0.
    """
    if len(records) < 2:
        return {}
    keys = sorted({k for values, _ in records for k in values})
    metric = [float(v) for _, v in records]
    out = {}
    for key in keys:
        codes: dict[str, float] = {}
        xs = []
        for values, _ in records:
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(float(value))
            else:
                xs.append(codes.setdefault(repr(value), float(len(codes))))
        out[key] = abs(_pearson(xs, metric))
    total = sum(out.values())
    return {k: (v / total if total else 0.0) for k, v in out.items()}


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0
    r = sxy / math.sqrt(sxx * syy)
    return 0.0 if math.isnan(r) else r
