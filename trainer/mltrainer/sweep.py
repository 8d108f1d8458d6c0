"""Hyperparameter sweeps: one MLflow parent run, one nested child run per trial.

A sweep file names a training config and a search space over its dotted keys::

    name: tiny-lr                       # optional; default: the sweep file's name
    base: tiny.yaml                     # a training config, relative to this file
    overrides: [training.max_steps=8]   # optional, applied to the base config first
    search:
      space:
        training.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
        training.per_device_train_batch_size: {type: categorical, choices: [8, 16]}
        training.warmup_steps: {type: int, low: 0, high: 4}
      trials: 8
      metric: eval_loss                 # a metric the trial runs log (TrainResult.metrics)
      direction: minimize               # or maximize
      backend: optuna                   # or ray
      algorithm: tpe                    # tpe | random | grid (grid: optuna only)
      parallel: 1                       # trials at a time
      seed: 7                           # sampler seed (optional)
      ray_address: null                 # ray: an existing cluster; null starts a local Ray
      storage: null                     # optuna: sqlite file (or any RDB URL)

Every trial is an ordinary :func:`mltrainer.train.train` run (our run naming, checkpoint policy
and uploads), created as a child of the sweep's parent run and tagged ``mltrainer.trial=<n>``;
its chosen values are logged again as ``trial.<key>`` params. The parent records the search
(algorithm, backend, space as JSON, trial count, metric, direction) and, as trials finish, the
best value (``best_<metric>``), the best trial's run id (tag ``best_trial_run_id``) and values
(``best.<key>``), each trial's value (``trial_<metric>`` at step = trial number) and plots.

Resuming (optuna): the study lives in a sqlite file, by default
``<output_root>/sweeps/<name>.db``, and remembers its parent run id. Running the same sweep
command again continues the same study and parent run and only runs the trials still missing;
trials that were cut off mid-run are marked failed (``interrupted``) and not counted.
``--fresh`` starts over. The ray backend does not resume: each invocation is a new sweep.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mltrainer.config import (TrainConfig, apply_overrides, build_config, read_config_mapping, read_yaml_file,
                              set_dotted, type_name)
from mltrainer.errors import ConfigError, did_you_mean, unknown_key_error

logger = logging.getLogger(__name__)

TAG_SWEEP = "mltrainer.sweep"
TAG_SWEEP_NAME = "mltrainer.sweep.name"
TAG_SWEEP_STATE = "mltrainer.sweep.state"
TAG_TRIAL = "mltrainer.trial"
TAG_BEST_RUN = "best_trial_run_id"
TAG_BEST_NUMBER = "best_trial_number"
PARENT_ATTR = "mlflow_parent_run_id"
SPEC_HASH_ATTR = "mltrainer_spec_hash"

TYPES = ("float", "int", "categorical")
BACKENDS = ("optuna", "ray")
DIRECTIONS = ("minimize", "maximize")
ALGORITHMS = {"optuna": ("tpe", "random", "grid"), "ray": ("random", "tpe")}
SEARCH_KEYS = ("space", "trials", "metric", "direction", "backend", "algorithm", "parallel", "seed",
               "ray_address", "storage")
TOP_KEYS = ("name", "base", "overrides", "search")
# Keys every trial must share: the parent and its children live in one experiment and one output root.
UNSEARCHABLE = {"experiment.name": "all trials must log to the sweep's experiment",
                "output_root": "all trials share the sweep's output root",
                "experiment.run_name": "the sweep names its trial runs itself"}


# --------------------------------------------------------------------------------------------
# The sweep file


@dataclass(frozen=True)
class ParamSpec:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def samples(self) -> list[Any]:
        """Values that must all make a valid config (checked before any trial runs)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid(self) -> list[Any] | None:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            return [self.low + i * self.step for i in range(n + 1)]
        return None

    def describe(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: str  # the sweep file, absolute
    base: str  # the training config, absolute
    overrides: tuple[str, ...]
    space: dict[str, ParamSpec]
    trials: int
    metric: str = "eval_loss"
    direction: str = "minimize"
    backend: str = "optuna"
    algorithm: str = "tpe"
    parallel: int = 1
    seed: int | None = None
    ray_address: str | None = None
    storage: str | None = None

    def space_json(self) -> str:
        return json.dumps({k: p.describe() for k, p in self.space.items()}, sort_keys=True)

    def identity_hash(self) -> str:
        """What must not change between sessions of one study (the trial count may grow)."""
        ident = {"base": self.base, "overrides": list(self.overrides), "space": self.space_json(),
                 "metric": self.metric, "direction": self.direction, "algorithm": self.algorithm}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b


def _number(value: Any, key: str, *, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(key, f"expected {'an integer' if integer else 'a number'}, got {type_name(value)} {value!r}")
    return value


def parse_param(key: str, data: Any) -> ParamSpec:
    where = f"search.space.{key}"
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping like {{type: float, low: 1.0e-5, high: 1.0e-3}}, "
                                 f"got {type_name(data)} {data!r}")
    allowed = ("type", "low", "high", "log", "step", "choices")
    for name in data:
        if name not in allowed:
            raise unknown_key_error(f"{where}.{name}", allowed)
    kind = data.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}.type", f"must be one of {', '.join(TYPES)}, got {kind!r}"
                                           f"{did_you_mean(str(kind), TYPES)}")
    if kind == "categorical":
        for name in ("low", "high", "log", "step"):
            if name in data:
                raise ConfigError(f"{where}.{name}", "does not apply to type categorical (use choices)")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices", f"expected a non-empty list, got {type_name(choices)} {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (str, int, float, bool)):
                raise ConfigError(f"{where}.choices", f"choices must be scalars, got {type_name(c)} {c!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}.choices", f"choices must be distinct, got {choices!r}")
        return ParamSpec(key, kind, choices=tuple(choices))
    if "choices" in data:
        raise ConfigError(f"{where}.choices", f"only applies to type categorical (type is {kind})")
    integer = kind == "int"
    for name in ("low", "high"):
        if data.get(name) is None:
            raise ConfigError(f"{where}.{name}", f"is required for type {kind}")
    low = _number(data["low"], f"{where}.low", integer=integer)
    high = _number(data["high"], f"{where}.high", integer=integer)
    if (high < low) if integer else (high <= low):
        raise ConfigError(f"{where}.high", f"must be {'>=' if integer else '>'} low ({low}), got {high}")
    log = data.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log", f"expected true or false, got {type_name(log)} {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}.low", f"must be > 0 with log: true, got {low}")
    step = data.get("step")
    if step is not None:
        step = _number(step, f"{where}.step", integer=integer)
        if step <= 0:
            raise ConfigError(f"{where}.step", f"must be > 0, got {step}")
        if log and not integer:
            raise ConfigError(f"{where}.step", "cannot be combined with log: true for type float")
    return ParamSpec(key, kind, low=low, high=high, log=log, step=step)


def load_base(path: Path) -> dict[str, Any]:
    """The sweep's base training config as a mapping; its file-level problems are the ``base`` key's."""
    try:
        return read_config_mapping(path)
    except ConfigError as exc:
        if exc.key is not None:
            raise
        raise ConfigError("base", exc.message) from None


@dataclass
class LoadedSweep:
    spec: SweepSpec
    base_data: dict[str, Any]  # the training config mapping, overrides applied, output_root absolute
    config_dir: str  # where the training config's relative paths are looked up
    base_cfg: TrainConfig


def load_sweep(path: str | Path, overrides: Iterable[str] = ()) -> LoadedSweep:
    """Read and validate a sweep file; ``overrides`` (``--set``) apply to the training config.

    Raises ConfigError naming the sweep key at fault (``search.space.training.lr``, ...).
    """
    path = Path(path)
    data = read_yaml_file(path, "sweep file")
    try:
        return _load_sweep(path.resolve(), data, list(overrides))
    except ConfigError as exc:
        if exc.source is None and exc.key is not None:
            exc.source = str(path)
        raise


def _backend_string(search: dict, key: str, backend: str, applies_to: str, expected: str) -> str | None:
    """An optional non-empty string of ``search`` that only one backend reads."""
    value = search.get(key)
    if value is None:
        return None
    if backend != applies_to:
        raise ConfigError(f"search.{key}", f"only applies to backend {applies_to} (backend is {backend})")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"search.{key}", f"expected {expected}, got {value!r}")
    return value


def _load_sweep(path: Path, data: Any, cli_overrides: list[str]) -> LoadedSweep:
    if not isinstance(data, Mapping):
        raise ConfigError(None, f"sweep file {str(path)!r} must hold a mapping, got {type_name(data)}")
    for name in data:
        if name not in TOP_KEYS:
            raise unknown_key_error(str(name), TOP_KEYS)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name", f"expected a non-empty string, got {type_name(name)} {name!r}")
    from mltrainer.naming import sanitize_component

    try:
        name = sanitize_component(name)
    except ValueError as exc:
        raise ConfigError("name", str(exc)) from None
    base = data.get("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError("base", f"is required: the path of a training config, got {type_name(base)} {base!r}")
    base_path = (path.parent / Path(base).expanduser()).resolve()
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("overrides", f"expected a list of 'dotted.key=value' strings, got {overrides!r}")

    search = data.get("search")
    if not isinstance(search, Mapping):
        raise ConfigError("search", f"is required: a mapping with space, trials, metric, ... got {type_name(search)}")
    for key in search:
        if key not in SEARCH_KEYS:
            raise unknown_key_error(f"search.{key}", SEARCH_KEYS)
    space_data = search.get("space")
    if not isinstance(space_data, Mapping) or not space_data:
        raise ConfigError("search.space", "expected a non-empty mapping of dotted config keys to ranges")
    space = {}
    for key, spec in space_data.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError("search.space", f"keys must be dotted config keys, got {key!r}")
        if key in UNSEARCHABLE:
            raise ConfigError(f"search.space.{key}", f"cannot be searched: {UNSEARCHABLE[key]}")
        space[key] = parse_param(key, spec)

    trials = search.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError("search.trials", f"expected an integer >= 1, got {type_name(trials)} {trials!r}")
    metric = search.get("metric", "eval_loss")
    if not isinstance(metric, str) or not metric.strip():
        raise ConfigError("search.metric", f"expected a metric name like eval_loss, got {metric!r}")
    direction = search.get("direction", "minimize")
    if direction not in DIRECTIONS:
        raise ConfigError("search.direction", f"must be minimize or maximize, got {direction!r}"
                                              f"{did_you_mean(str(direction), DIRECTIONS)}")
    backend = search.get("backend", "optuna")
    if backend not in BACKENDS:
        raise ConfigError("search.backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}"
                                            f"{did_you_mean(str(backend), BACKENDS)}")
    algorithm = search.get("algorithm") or ("tpe" if backend == "optuna" else "random")
    if algorithm not in ALGORITHMS[backend]:
        raise ConfigError("search.algorithm", f"backend {backend} supports {', '.join(ALGORITHMS[backend])}, "
                                              f"got {algorithm!r}")
    if algorithm == "grid":
        missing = [k for k, p in space.items() if p.grid() is None]
        if missing:
            raise ConfigError(f"search.space.{missing[0]}",
                              "algorithm grid needs categorical or int entries (or float with a step)")
        size = math.prod(len(p.grid()) for p in space.values())
        if trials > size:
            raise ConfigError("search.trials", f"the grid has only {size} points, got trials: {trials}")
    parallel = search.get("parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError("search.parallel", f"expected an integer >= 1, got {parallel!r}")
    seed = search.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError("search.seed", f"expected an integer, got {type_name(seed)} {seed!r}")
    ray_address = _backend_string(search, "ray_address", backend, "ray", "an address like ray://host:10001")
    storage = _backend_string(search, "storage", backend, "optuna", "a sqlite file path or a database URL")

    # The base config, with the sweep's overrides then the command line's.
    base_data = load_base(base_path)
    config_dir = base_path.parent
    try:
        apply_overrides(base_data, [*overrides, *cli_overrides])
        base_cfg = build_config(copy.deepcopy(base_data), config_dir=config_dir)
    except ConfigError as exc:
        if exc.source is None:
            exc.source = str(base_path)
        raise
    base_data["output_root"] = str(Path(base_cfg.output_root).resolve())

    # Every searched key must make a valid config with each sampled boundary / choice.
    for key, param in space.items():
        for value in param.samples():
            trial_data = copy.deepcopy(base_data)
            try:
                set_dotted(trial_data, key, value)
                build_config(trial_data, config_dir=config_dir)
            except ConfigError as exc:
                raise ConfigError(f"search.space.{key}",
                                  f"is not a valid training config key or value ({key}={value!r} gives: {exc})") from None

    if metric.startswith("eval_"):
        strategy = base_cfg.training.get("eval_strategy", "no")
        if not base_cfg.data.has_eval or strategy in ("no", None, False):
            raise ConfigError("search.metric", f"{metric!r} needs evaluation: the training config must have eval "
                                               "data and training.eval_strategy 'steps' or 'epoch'")
    if storage is not None and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    spec = SweepSpec(name=name, path=str(path), base=str(base_path), overrides=tuple([*overrides, *cli_overrides]),
                     space=space, trials=trials, metric=metric, direction=direction, backend=backend,
                     algorithm=algorithm, parallel=parallel, seed=seed, ray_address=ray_address, storage=storage)
    return LoadedSweep(spec, base_data, str(config_dir), base_cfg)


# --------------------------------------------------------------------------------------------
# One trial (runs in this process for optuna, in a Ray worker for ray)


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


def run_trial(job: TrialJob, number: int, values: Mapping[str, Any]) -> tuple[float, str]:
    """Train one trial as a child run; returns (metric value, run id). Raises when the trial fails."""
    from mlflow.tracking import MlflowClient

    from mltrainer import plots
    from mltrainer.train import train

    client = MlflowClient()
    logger.info("trial %d: %s", number, ", ".join(f"{k}={v!r}" for k, v in values.items()))
    cfg = trial_config(job, values, f"-trial-{number}")
    try:
        result = train(cfg, parent_run_id=job.parent_run_id,
                       extra_tags={TAG_TRIAL: str(number), TAG_SWEEP_NAME: job.sweep_name})
    except BaseException:
        try:
            if run_id := find_child_run(client, job.experiment_id, job.parent_run_id, TAG_TRIAL, str(number)):
                log_chosen_values(client, run_id, values)
        except Exception:  # noqa: BLE001 - the training error matters more
            logger.warning("could not log the values of failed trial %d", number, exc_info=True)
        raise
    log_chosen_values(client, result.run_id, values)
    plots.log_run_plots(client, cfg, result)
    if job.metric not in result.metrics:
        raise MetricMissing(f"trial {number} (run {result.run_id}) did not log {job.metric!r}; "
                            f"it logged: {', '.join(sorted(result.metrics)) or 'nothing'}")
    return float(result.metrics[job.metric]), result.run_id


# --------------------------------------------------------------------------------------------
# Bookkeeping shared by the backends


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


# --------------------------------------------------------------------------------------------
# Optuna


def storage_url(spec: SweepSpec, output_root: str) -> str:
    if spec.storage and "://" in spec.storage:
        return spec.storage
    path = Path(spec.storage) if spec.storage else Path(output_root) / "sweeps" / f"{spec.name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _optuna_sampler(spec: SweepSpec):
    import optuna

    if spec.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.algorithm == "grid":
        return optuna.samplers.GridSampler({k: p.grid() for k, p in spec.space.items()}, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def suggest(trial, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(param.key, list(param.choices))
    if param.type == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(param.key, float(param.low), float(param.high), step=param.step, log=param.log)


def run_optuna(loaded: LoadedSweep, client, *, max_trials: int | None, fresh: bool) -> SweepOutcome:
    import optuna
    from optuna.trial import TrialState

    spec = loaded.spec
    url = storage_url(spec, loaded.base_data["output_root"])
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                         if url.startswith("sqlite") else {})
    if fresh:
        try:
            optuna.delete_study(study_name=spec.name, storage=storage)
            logger.info("--fresh: deleted study %s from %s", spec.name, url)
        except KeyError:
            pass
    direction = spec.direction
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=direction,
                                sampler=_optuna_sampler(spec), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError("search.direction", f"study {spec.name!r} in {url} was created with direction "
                                              f"{study.direction.name.lower()}; use --fresh or another name")
    from mltrainer import tracking

    experiment_id = tracking.get_or_create_experiment(client, loaded.base_cfg.experiment.name)
    attrs = study.user_attrs
    if attrs.get(SPEC_HASH_ATTR) not in (None, spec.identity_hash()):
        raise ConfigError("search", f"the sweep changed since study {spec.name!r} was created in {url} "
                                    "(base config, overrides, space, metric, direction or algorithm); "
                                    "run with --fresh to start over, or give the sweep another name")
    parent_run_id = attrs.get(PARENT_ATTR)
    if parent_run_id:
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as exc:
            raise ConfigError("search", f"study {spec.name!r} in {url} belongs to parent run {parent_run_id}, "
                                        f"which cannot be read ({exc}); run with --fresh to start over") from None
        if parent.info.lifecycle_stage != "active":
            raise ConfigError("search", f"the parent run {parent_run_id} of study {spec.name!r} was deleted; "
                                        "run with --fresh to start over")
        experiment_id = parent.info.experiment_id
        client.update_run(parent_run_id, status="RUNNING")
        logger.info("continuing sweep %s: parent run %s, study in %s", spec.name, parent_run_id, url)
    else:
        parent_run_id = create_parent(client, loaded, experiment_id)
        study.set_user_attr(PARENT_ATTR, parent_run_id)
        study.set_user_attr(SPEC_HASH_ATTR, spec.identity_hash())
        logger.info("sweep %s: parent run %s, study in %s", spec.name, parent_run_id, url)

    # Trials cut off by an interruption: failed (and not counted), their runs marked KILLED.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        run_id = t.user_attrs.get("run_id") or find_child_run(client, experiment_id, parent_run_id, TAG_TRIAL,
                                                              str(t.number))
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        logger.warning("trial %d was interrupted in an earlier session: marked failed, not counted", t.number)

    def counted(trials) -> int:
        return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))

    done = counted(study.get_trials(deepcopy=False))
    remaining = max(0, spec.trials - done)
    to_run = remaining if max_trials is None else min(remaining, max_trials)
    logger.info("sweep %s: %d of %d trials done, running %d now", spec.name, done, spec.trials, to_run)
    job = TrialJob(spec.name, loaded.base_data, loaded.config_dir, parent_run_id, experiment_id, spec.metric,
                   tuple(spec.space))

    def objective(trial):
        values = {key: suggest(trial, param) for key, param in spec.space.items()}
        try:
            value, run_id = run_trial(job, trial.number, values)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            logger.error("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise
        trial.set_user_attr("run_id", run_id)
        return value

    client.set_tag(parent_run_id, TAG_SWEEP_STATE, "running")
    try:
        if to_run:
            study.optimize(objective, n_trials=to_run, n_jobs=spec.parallel, catch=(Exception,))
    except BaseException:
        _safe_terminate(client, parent_run_id, "KILLED")
        raise

    records = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("interrupted") or t.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        run_id = t.user_attrs.get("run_id")
        if run_id is None and t.state == TrialState.FAIL:
            run_id = find_child_run(client, experiment_id, parent_run_id, TAG_TRIAL, str(t.number))
        records.append(TrialRecord(t.number, t.state.name, dict(t.params), t.value, run_id, t.user_attrs.get("error")))
    complete = counted(study.get_trials(deepcopy=False)) >= spec.trials
    importances, method = optuna_importances(study, records)
    best = summarize(client, spec, parent_run_id, records, complete=complete, importances=importances,
                     importance_method=method)
    finish_parent(client, parent_run_id, complete, best is not None)
    return SweepOutcome(parent_run_id, records, complete, best)


def optuna_importances(study, records: Sequence[TrialRecord]) -> tuple[dict[str, float], str]:
    complete = [r for r in records if r.state == "COMPLETE" and r.value is not None]
    if len(complete) < 2:
        return {}, ""
    try:
        import optuna

        return dict(optuna.importance.get_param_importances(study)), "optuna fANOVA"
    except Exception as exc:  # noqa: BLE001 - e.g. no parameter varied yet
        logger.info("optuna importance not available (%s); using correlation", exc)
        from mltrainer.plots import correlation_importance

        return correlation_importance([(r.values, r.value) for r in complete]), "|correlation|"


def _safe_terminate(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001
        logger.warning("could not mark the parent run %s %s", run_id, status, exc_info=True)


# --------------------------------------------------------------------------------------------
# Ray Tune


RAY_FORWARDED_ENV = ("MLFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "AWS_", "PYTHONPATH")


def trial_number_from_id(trial_id: str) -> int | None:
    """Ray trial ids end in a zero-padded counter (``a1b2c_00003`` -> 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _ray_trainable(config: dict[str, Any], job: TrialJob | None = None) -> None:
    """Ray Tune function trainable: one trial = one train() child run in this Ray worker."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    number = trial_number_from_id(trial_id)
    values = {key: config[key] for key in job.keys}
    value, run_id = run_trial(job, number if number is not None else -1, values)
    tune.report({job.metric: value, "run_id": run_id, "trial_number": number})


def _ray_domain(param: ParamSpec):
    from ray import tune

    if param.type == "categorical":
        return tune.choice(list(param.choices))
    if param.type == "int":
        if param.log:
            return tune.lograndint(int(param.low), int(param.high) + 1)
        return tune.qrandint(int(param.low), int(param.high), int(param.step)) if param.step \
            else tune.randint(int(param.low), int(param.high) + 1)
    if param.log:
        return tune.loguniform(float(param.low), float(param.high))
    return tune.quniform(float(param.low), float(param.high), param.step) if param.step \
        else tune.uniform(float(param.low), float(param.high))


def run_ray(loaded: LoadedSweep, client, *, max_trials: int | None) -> SweepOutcome:
    import ray
    from ray import tune

    spec = loaded.spec
    n = spec.trials if max_trials is None else min(spec.trials, max_trials)
    from mltrainer import tracking

    experiment_id = tracking.get_or_create_experiment(client, loaded.base_cfg.experiment.name)
    parent_run_id = create_parent(client, loaded, experiment_id)
    logger.info("sweep %s (ray): parent run %s, %d trials", spec.name, parent_run_id, n)
    job = TrialJob(spec.name, loaded.base_data, loaded.config_dir, parent_run_id, experiment_id, spec.metric,
                   tuple(spec.space))
    env = {k: v for k, v in os.environ.items() if k.startswith(RAY_FORWARDED_ENV)}
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    started_here = not ray.is_initialized()
    if started_here:
        if spec.ray_address:
            ray.init(address=spec.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            ray.init(num_cpus=max(2, spec.parallel), include_dashboard=False, runtime_env={"env_vars": env},
                     log_to_driver=True)
    try:
        search_alg = None
        if spec.algorithm == "tpe":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed), metric=spec.metric,
                                      mode="min" if spec.direction == "minimize" else "max")
        elif spec.seed is not None:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # A search_alg given to Tune is not limited by max_concurrent_trials: limit it here.
            search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.parallel)
        trainable = tune.with_resources(tune.with_parameters(_ray_trainable, job=job), {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            param_space={key: _ray_domain(p) for key, p in spec.space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode="min" if spec.direction == "minimize" else "max", num_samples=n,
                max_concurrent_trials=spec.parallel, search_alg=search_alg,
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{parent_run_id[:8]}",
                storage_path=str(Path(loaded.base_data["output_root"]) / "sweeps" / "ray"),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=1,
            ),
        )
        grid = tuner.fit()
    except BaseException:
        _safe_terminate(client, parent_run_id, "KILLED")
        raise
    finally:
        if started_here:
            ray.shutdown()

    keys = list(spec.space)
    records = []
    for result in grid:
        values = {key: result.config.get(key) for key in keys}
        number = trial_number_from_id(Path(result.path).name.removeprefix("trial_")) if result.path else None
        if number is None:
            number = (result.metrics or {}).get("trial_number")
        if result.error is None and spec.metric in (result.metrics or {}):
            records.append(TrialRecord(number, "COMPLETE", values, float(result.metrics[spec.metric]),
                                       result.metrics.get("run_id")))
        else:
            run_id = find_child_run(client, experiment_id, parent_run_id, TAG_TRIAL, str(number))
            records.append(TrialRecord(number, "FAIL", values, None, run_id,
                                       str(result.error).strip().splitlines()[-1][:1000] if result.error else None))
    records.sort(key=lambda r: (r.number is None, r.number))
    from mltrainer.plots import correlation_importance

    complete_records = [(r.values, r.value) for r in records if r.state == "COMPLETE"]
    importances = correlation_importance(complete_records) if len(complete_records) >= 2 else {}
    best = summarize(client, spec, parent_run_id, records, complete=True, importances=importances,
                     importance_method="|correlation|")
    finish_parent(client, parent_run_id, True, best is not None)
    return SweepOutcome(parent_run_id, records, True, best)


# --------------------------------------------------------------------------------------------
# Entry point


def run_sweep(loaded: LoadedSweep, *, max_trials: int | None = None, fresh: bool = False) -> SweepOutcome:
    from mlflow.tracking import MlflowClient

    from mltrainer import tracking

    if loaded.base_cfg.tracking.uri:
        os.environ["MLFLOW_TRACKING_URI"] = loaded.base_cfg.tracking.uri
    client = MlflowClient()
    tracking.check_server(client)
    if loaded.spec.backend == "ray":
        if fresh:
            logger.info("--fresh has no effect with backend ray: every ray sweep starts fresh")
        return run_ray(loaded, client, max_trials=max_trials)
    return run_optuna(loaded, client, max_trials=max_trials, fresh=fresh)


def format_trials(spec: SweepSpec, records: Sequence[TrialRecord], best: TrialRecord | None) -> str:
    keys = list(spec.space)
    header = ["trial", "state", spec.metric, "run id", *keys]
    rows = []
    for r in records:
        rows.append([f"{r.number}{' *' if best is not None and r is best else ''}", r.state,
                     "" if r.value is None else f"{r.value:.6g}", r.run_id or "-",
                     *(_short(r.values.get(k)) for k in keys)])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
