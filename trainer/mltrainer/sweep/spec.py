"""The sweep file: read, validated (every key checked, each error naming the key at fault) and
tried against the training config before anything runs.

Validation uses the training config's own machinery (``config._Section``), so a sweep file
answers a wrong type, an unknown key or a value out of range in the same words as a config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mltrainer.config import (TrainConfig, _Section, apply_overrides, build_config, read_config_mapping,
                              read_yaml_file, set_dotted, type_name)
from mltrainer.errors import ConfigError

from .space import ParamSpec, parse_param

BACKENDS = ("optuna", "ray")
DIRECTIONS = ("minimize", "maximize")
ALGORITHMS = {"optuna": ("tpe", "random", "grid"), "ray": ("random", "tpe")}  # the first is the default
SEARCH_KEYS = ("space", "trials", "metric", "direction", "backend", "algorithm", "parallel", "seed",
               "ray_address", "storage")
TOP_KEYS = ("name", "base", "overrides", "search")
# Keys every trial must share: the parent and its children live in one experiment and one output root.
UNSEARCHABLE = {"experiment.name": "all trials must log to the sweep's experiment",
                "output_root": "all trials share the sweep's output root",
                "experiment.run_name": "the sweep names its trial runs itself"}


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


def _backend_string(search: _Section, key: str, backend: str, applies_to: str, expected: str) -> str | None:
    """An optional non-empty string of ``search`` that only one backend reads."""
    if not search.has(key):
        return None
    if backend != applies_to:
        raise ConfigError(search.key_of(key), f"only applies to backend {applies_to} (backend is {backend})")
    value = search.raw(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(search.key_of(key), f"expected {expected}, got {value!r}")
    return value


def _space(search: _Section) -> dict[str, ParamSpec]:
    space_data = search.get_mapping("space")
    if not space_data:
        raise ConfigError("search.space", "expected a non-empty mapping of dotted config keys to ranges")
    space = {}
    for key, spec in space_data.items():
        if not key.strip():
            raise ConfigError("search.space", f"keys must be dotted config keys, got {key!r}")
        if key in UNSEARCHABLE:
            raise ConfigError(f"search.space.{key}", f"cannot be searched: {UNSEARCHABLE[key]}")
        space[key] = parse_param(key, spec)
    return space


def _load_sweep(path: Path, data: Any, cli_overrides: list[str]) -> LoadedSweep:
    if not isinstance(data, Mapping):  # the file as a whole: no key to name
        raise ConfigError(None, f"sweep file {str(path)!r} must hold a mapping, got {type_name(data)}")
    top = _Section(data, "", TOP_KEYS)
    name = top.get_str("name", path.stem)
    from mltrainer.naming import sanitize_component

    try:
        name = sanitize_component(name)
    except ValueError as exc:
        raise ConfigError("name", str(exc)) from None
    if not top.has("base"):
        raise ConfigError("base", "is required: the path of a training config")
    base_path = (path.parent / Path(top.get_str("base")).expanduser()).resolve()
    overrides = top.raw("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("overrides", f"expected a list of 'dotted.key=value' strings, got {overrides!r}")

    if not top.has("search"):
        raise ConfigError("search", "is required: a mapping with space, trials, metric, ...")
    search = _Section(top.raw("search"), "search", SEARCH_KEYS)
    space = _space(search)
    trials = search.get_int("trials", minimum=1)
    metric = search.get_str("metric", "eval_loss")
    direction = search.get_str("direction", "minimize", choices=DIRECTIONS)
    backend = search.get_str("backend", "optuna", choices=BACKENDS)
    algorithm = search.get_str("algorithm", ALGORITHMS[backend][0])
    if algorithm not in ALGORITHMS[backend]:  # said here: which algorithms exist depends on the backend
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
    parallel = search.get_int("parallel", 1, minimum=1)
    seed = search.get_int("seed", None)
    ray_address = _backend_string(search, "ray_address", backend, "ray",
                                  "the head node's address, host:port (ray start --head --port)")
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
        if not base_cfg.data.has_eval or not base_cfg.evaluates:
            raise ConfigError("search.metric", f"{metric!r} needs evaluation: the training config must have eval "
                                               "data and training.eval_strategy 'steps' or 'epoch'")
    if storage is not None and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    spec = SweepSpec(name=name, path=str(path), base=str(base_path), overrides=tuple([*overrides, *cli_overrides]),
                     space=space, trials=trials, metric=metric, direction=direction, backend=backend,
                     algorithm=algorithm, parallel=parallel, seed=seed, ray_address=ray_address, storage=storage)
    return LoadedSweep(spec, base_data, str(config_dir), base_cfg)
