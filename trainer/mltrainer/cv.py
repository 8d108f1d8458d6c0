"""k-fold cross-validation: one parent run, one nested child run per fold.

The rows of ``data.files.train`` are shuffled deterministically (``--seed``, default the
config's ``training.seed``) and cut into k folds; fold i trains on the other k-1 folds and
evaluates on fold i (the config's own ``data.files.eval`` is not used). The fold files are
written to a temporary directory and the fold's config points ``data.files.train``/``eval`` at
them. Each fold is an ordinary :func:`mltrainer.train.train` run, a child of the parent and
tagged ``mltrainer.fold=<i>``. The parent gets ``<metric>_mean`` and ``<metric>_std``
(population standard deviation, ddof=0) for each chosen metric, each fold's value as
``fold_<metric>`` at step = fold, and the fold assignment as ``cv/folds.json``.

Only ``data.files`` configs are supported: a Hub dataset has no single file to split.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltrainer.config import TrainConfig, apply_overrides, build_config, read_config_mapping
from mltrainer.errors import ConfigError

logger = logging.getLogger(__name__)

TAG_CV = "mltrainer.cv"
TAG_FOLD = "mltrainer.fold"
EXTENSIONS = {"csv": ".csv", "json": ".jsonl", "parquet": ".parquet"}


@dataclass
class CvSetup:
    cfg: TrainConfig
    data: dict[str, Any]  # the config mapping, overrides applied
    config_dir: Path
    config_path: Path
    folds: int
    seed: int
    metrics: list[str]


@dataclass
class FoldResult:
    fold: int
    run_id: str
    metrics: dict[str, float]


@dataclass
class CvOutcome:
    parent_run_id: str
    folds: list[FoldResult]
    aggregates: dict[str, float]


def load_cv(config_path: str | Path, overrides: Sequence[str], folds: int, metrics: Sequence[str],
            seed: int | None) -> CvSetup:
    path = Path(config_path)
    data = read_config_mapping(path)
    config_dir = path.resolve().parent
    try:
        apply_overrides(data, overrides)
        cfg = build_config(copy.deepcopy(data), config_dir=config_dir)
    except ConfigError as exc:
        if exc.source is None and exc.key is not None:
            exc.source = str(path)
        raise
    if cfg.data.files is None:
        raise ConfigError("data.hub", "cross-validation needs a local training file (data.files.train): "
                                      "Hub datasets are not supported by `mltrainer cv`", source=str(path))
    if folds < 2:
        raise ConfigError("--folds", f"needs at least 2 folds, got {folds}")
    metrics = list(metrics) or ["eval_loss"]
    if any(m.startswith("eval_") for m in metrics) and not cfg.evaluates:
        raise ConfigError("training.eval_strategy", f"--metric {metrics[0]} needs evaluation: set "
                                                    "training.eval_strategy to steps or epoch", source=str(path))
    data["output_root"] = str(Path(cfg.output_root).resolve())
    if seed is None:
        seed = int(cfg.training.get("seed", 42))
    return CvSetup(cfg, data, config_dir, path.resolve(), folds, seed, metrics)


def fold_indices(n: int, folds: int, seed: int) -> list[list[int]]:
    """Deterministic shuffled split of ``range(n)`` into ``folds`` near-equal parts."""
    import random

    if n < folds:
        raise ConfigError("--folds", f"the training file has {n} rows, fewer than {folds} folds")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size, extra = divmod(n, folds)
    out, start = [], 0
    for i in range(folds):
        end = start + size + (1 if i < extra else 0)
        out.append(sorted(order[start:end]))
        start = end
    return out


def write_fold_files(setup: CvSetup, workdir: Path) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Write train/eval files per fold; returns their paths and the eval indices of each fold."""
    from datasets import load_dataset

    files = setup.cfg.data.files
    table = load_dataset(files.format, data_files={"train": files.train})["train"]
    parts = fold_indices(len(table), setup.folds, setup.seed)
    ext = EXTENSIONS[files.format]
    out = []
    for i, eval_idx in enumerate(parts):
        held = set(eval_idx)
        train_idx = [j for j in range(len(table)) if j not in held]
        paths = (workdir / f"fold-{i}-train{ext}", workdir / f"fold-{i}-eval{ext}")
        for subset, target in ((train_idx, paths[0]), (eval_idx, paths[1])):
            part = table.select(subset)
            if files.format == "csv":
                part.to_csv(str(target), index=False)
            elif files.format == "json":
                part.to_json(str(target), lines=True)
            else:
                part.to_parquet(str(target))
        out.append((str(paths[0]), str(paths[1])))
    return out, parts


def fold_config(setup: CvSetup, fold: int, train_file: str, eval_file: str) -> TrainConfig:
    data = copy.deepcopy(setup.data)
    data["data"]["files"] = {"train": train_file, "eval": eval_file, "format": setup.cfg.data.files.format}
    experiment = data.setdefault("experiment", {})
    experiment["run_name"] = f"{experiment.get('run_name') or '{model}-{task}'}-fold-{fold}"
    return build_config(data, config_dir=setup.config_dir)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def run_cv(setup: CvSetup) -> CvOutcome:
    from mlflow.entities import Metric, Param

    from mltrainer import tracking
    from mltrainer.train import train

    cfg = setup.cfg
    client = tracking.client_for(cfg)
    tracking.check_server(client)
    workdir = Path(tempfile.mkdtemp(prefix="mltrainer-cv-"))
    try:
        fold_files, parts = write_fold_files(setup, workdir)
        experiment_id = tracking.get_or_create_experiment(client, cfg.experiment.name)
        tags = {TAG_CV: "true", tracking.TAG_MODEL: cfg.model.name_or_path, tracking.TAG_TASK: cfg.model.task,
                tracking.TAG_DATASET: tracking.dataset_name(cfg), **cfg.experiment.tags}
        if commit := tracking.git_commit():
            tags["mlflow.source.git.commit"] = commit
        scrubber = cfg.scrubber()
        parent_run_id = tracking.open_run(client, experiment_id, f"{cfg.run_name()}-cv{setup.folds}", tags, scrubber)
        logger.info("cross-validation: parent run %s, %d folds", parent_run_id, setup.folds)
        params = {"cv.folds": str(setup.folds), "cv.seed": str(setup.seed), "cv.metrics": ",".join(setup.metrics),
                  "cv.train_file": cfg.data.files.train, "cv.std": "population (ddof=0)",
                  "cv.fold_sizes": json.dumps([len(p) for p in parts]), "cv.config": str(setup.config_path)}
        tracking.log_flat_params(client, parent_run_id, params, scrubber)
        folds_json = workdir / "folds.json"
        folds_json.write_text(json.dumps({"seed": setup.seed, "train_file": cfg.data.files.train,
                                          "eval_rows_by_fold": parts}))
        client.log_artifact(parent_run_id, str(folds_json), "cv")
        results = []
        try:
            for i, (train_file, eval_file) in enumerate(fold_files):
                fcfg = fold_config(setup, i, train_file, eval_file)
                logger.info("fold %d/%d: %d eval rows", i + 1, setup.folds, len(parts[i]))
                result = train(fcfg, parent_run_id=parent_run_id, extra_tags={TAG_FOLD: str(i)})
                client.log_batch(result.run_id, params=[
                    Param("fold.index", str(i)), Param("fold.count", str(setup.folds)),
                    Param("fold.eval_rows", str(len(parts[i]))),
                    Param("fold.train_rows", str(sum(len(p) for j, p in enumerate(parts) if j != i)))])
                missing = [m for m in setup.metrics if m not in result.metrics]
                if missing:
                    raise ConfigError("--metric", f"fold {i} (run {result.run_id}) did not log {', '.join(missing)}; "
                                                  f"it logged: {', '.join(sorted(result.metrics))}")
                results.append(FoldResult(i, result.run_id, dict(result.metrics)))
                now = int(time.time() * 1000)
                client.log_batch(parent_run_id, metrics=[Metric(f"fold_{m}", result.metrics[m], now, i)
                                                         for m in setup.metrics])
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                client.set_terminated(parent_run_id, status)
            except Exception:  # noqa: BLE001
                logger.warning("could not mark the parent run %s", parent_run_id, exc_info=True)
            raise
        aggregates = {}
        for m in setup.metrics:
            mean, std = mean_std([r.metrics[m] for r in results])
            aggregates[f"{m}_mean"], aggregates[f"{m}_std"] = mean, std
        now = int(time.time() * 1000)
        client.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in aggregates.items()])
        client.set_terminated(parent_run_id, "FINISHED")
        return CvOutcome(parent_run_id, results, aggregates)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
