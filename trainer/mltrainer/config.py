"""Load and validate the training config (YAML) before any work starts.

Every problem is a :class:`~mltrainer.errors.ConfigError` naming the dotted key at fault
(``training.learnin_rate``, ``data.files.train``), with a did-you-mean for typos, so a bad
config fails in a second instead of after the model has downloaded and trained.

YAML dialect. PyYAML implements YAML 1.1, which has two traps for training configs, fixed here
for both the file and ``--set`` overrides:

* ``3e-5`` is read as the *string* "3e-5" (1.1 requires a dot in floats). Here it is a float.
* ``no``/``yes``/``on``/``off`` are booleans, so ``eval_strategy: no`` would become ``False``.
  Here only ``true``/``false`` (any case) are booleans, as in YAML 1.2.

Duplicate keys in a mapping, which PyYAML silently resolves to the last one, are an error.

Relative paths (``data.files.*``, a local ``model.name_or_path`` or ``model.tokenizer``) are
looked up in the current working directory first, then in the config file's directory, and
stored resolved (absolute), so the rest of the program never depends on the cwd again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError, did_you_mean, unknown_key_error
from .limits import (
    EXPERIMENT_NAME_MAX_CHARS,
    RUN_NAME_MAX_CHARS,
    NameTooLongError,
    check_length,
    model_alias_problem,
    registered_model_name_problem,
)
from .lease import DEFAULT_LEASE_SECONDS, MIN_LEASE_SECONDS
from .monitor import metric_problem
from .naming import render_run_name, sanitize_component, template_fields, validate_template
from .policy import MODES, UPLOAD_MODES, CheckpointPolicy
from .run_match import RunNamePattern
from .redaction import Scrubber, secret_keys_in

TASKS = ("sequence-classification", "causal-lm")
DATA_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
RUN_NAME_FIELDS = ("model", "task", "experiment", "timestamp", "config_hash")
DEFAULT_RUN_NAME = "{model}-{task}"
RUN_NAME_TIMESTAMP = "%Y%m%d-%H%M%S"  # UTC
RUN_NAME_TIMESTAMP_REGEX = r"\d{8}-\d{6}"  # what RUN_NAME_TIMESTAMP renders
# Every moment renders {timestamp} (YYYYmmdd-HHMMSS) to as many characters, so one rendering at
# load time has the length and the characters of every run name the config will produce.
_SAMPLE_TIMESTAMP = datetime(2000, 1, 1, tzinfo=timezone.utc)
# TrainingArguments fields mltrainer sets itself; a user value would be silently overridden.
OWNED_TRAINING_KEYS = {
    "output_dir": "set by mltrainer from output_root and the run name; use output_root",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_REQUIRED = object()


# --------------------------------------------------------------------------------------------
# YAML loading


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style floats and booleans, and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults" may legitimately repeat keys it merges in
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, *, source: str = "<string>") -> Any:
    """Parse YAML in the config dialect; errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(None, f"{where}: invalid YAML: {problem}") from None


# --------------------------------------------------------------------------------------------
# Config dataclasses
#
# Each field's default here is the only default for its config key: the section parsers below
# and the runtime modules (uploader.py) read it from the class, e.g. ``UploadConfig.queue_size``.


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    run_name: str = DEFAULT_RUN_NAME
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str  # hub id, or a resolved absolute local path
    task: str
    num_labels: int | None = None
    tokenizer: str | None = None
    from_config: bool = False  # build an untrained model from the config only (tiny test models)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).is_absolute()


@dataclass(frozen=True)
class HubDataConfig:
    name: str
    config: str | None = None
    split_train: str = "train"
    split_eval: str | None = None


@dataclass(frozen=True)
class FilesDataConfig:
    train: str
    format: str
    eval: str | None = None


@dataclass(frozen=True)
class DataConfig:
    hub: HubDataConfig | None = None
    files: FilesDataConfig | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    @property
    def has_eval(self) -> bool:
        return (self.hub is not None and self.hub.split_eval is not None) or (
            self.files is not None and self.files.eval is not None
        )


@dataclass(frozen=True)
class UploadConfig:
    queue_size: int = 2
    max_retries: int = 5
    backoff_seconds: float = 1.0
    background_parts: int = 1  # parts of a file in flight while training runs and uploads keep up


@dataclass(frozen=True)
class RegisteredModelConfig:
    name: str
    alias: str = "champion"


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # normally unset: MLFLOW_TRACKING_URI from the environment
    # Metrics queued within this many seconds go to the server as one request (0: one per log
    # call). Every request costs the server tens of ms of CPU; at logging_steps=5 a small model
    # sent 6 a second, and on a shared box that CPU came out of the training steps (bench/).
    metrics_flush_seconds: int = 2
    # A trainer renews its lease on the run 4 times per lease; a run whose lease was not renewed
    # for this long counts as abandoned (crashed) and may be resumed by another process (lease.py).
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    # CPU, memory, disk, network (and GPU) use logged as system/* metrics while training (system_metrics.py).
    system_metrics: bool = True


@dataclass(frozen=True)
class TrainConfig:
    experiment: ExperimentConfig
    model: ModelConfig
    data: DataConfig
    training: dict[str, Any] = field(default_factory=dict)
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    upload: UploadConfig = field(default_factory=UploadConfig)
    output_root: str = "outputs"
    registered_model: RegisteredModelConfig | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    log_final_model: bool = True  # the trained model as an MLflow model at the end (a few seconds)

    @property
    def evaluates(self) -> bool:
        """Whether the Trainer runs evaluation: ``training.eval_strategy`` other than TrainingArguments'
        default, ``no``."""
        return self.training.get("eval_strategy", "no") not in ("no", None, False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config_hash`` hashes and runs log)."""
        return dataclasses.asdict(self)

    def scrubber(self) -> Scrubber:
        """What takes the secrets of this config and of the environment out of everything a run stores."""
        return Scrubber.for_run(self.to_dict())

    def run_name(self, timestamp: datetime | None = None) -> str:
        """Render ``experiment.run_name``. Fields: model (last part of name_or_path), task,
        experiment, timestamp (UTC, ``YYYYmmdd-HHMMSS``) and config_hash.

        Any secret in it is replaced: the name is stored (run name, tag, local folder)."""
        return self.scrubber().text(render_run_name(self.experiment.run_name, **self._run_name_fields(timestamp)))

    def run_name_pattern(self) -> RunNamePattern:
        """The names runs of this config get, whatever their timestamp (``--resume latest``)."""
        placeholder = "\0timestamp\0"  # no rendered field can contain a NUL
        fields = self._run_name_fields(None)
        fields["timestamp"] = placeholder
        rendered = self.scrubber().text(render_run_name(self.experiment.run_name, **fields))
        return RunNamePattern.from_rendered(rendered, placeholder, RUN_NAME_TIMESTAMP_REGEX)

    def _run_name_fields(self, timestamp: datetime | None) -> dict[str, str]:
        when = (timestamp or datetime.now(timezone.utc)).astimezone(timezone.utc)
        return {
            "model": _model_short_name(self.model.name_or_path),
            "task": self.model.task,
            "experiment": self.experiment.name,
            "timestamp": when.strftime(RUN_NAME_TIMESTAMP),
            "config_hash": config_hash(self),
        }


def _model_short_name(name_or_path: str) -> str:
    last = name_or_path.rstrip("/").rsplit("/", 1)[-1]
    try:
        return sanitize_component(last)
    except ValueError:
        return "model"


def config_hash(cfg: TrainConfig) -> str:
    """First 12 hex chars of the sha256 of the resolved config as canonical JSON.

    Identical configs hash the same whatever their key order or file location; any change in
    a resolved value (including a data path) changes it.
    """
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Validation helpers


def type_name(value: Any) -> str:
    """How a YAML value's type is named in error messages."""
    return "null" if value is None else type(value).__name__


class _Section:
    """One mapping of the config: refuses unknown keys and reads typed values by name."""

    def __init__(self, data: Any, key: str, allowed: Sequence[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type_name(data)} {data!r}")
        for name in data:
            if name not in allowed:
                raise unknown_key_error(self._join(key, str(name)), allowed)
        self.data = data
        self.key = key

    @staticmethod
    def _join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def key_of(self, name: str) -> str:
        return self._join(self.key, name)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def _get(self, name: str, default: Any) -> Any:
        value = self.data.get(name)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(self.key_of(name), "is required")
            return default
        return value

    def get_str(self, name: str, default: Any = _REQUIRED, *, choices: Sequence[str] | None = None) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.key_of(name), f"expected a non-empty string, got {type_name(value)} {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(
                self.key_of(name), f"must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"
            )
        return value

    def get_int(self, name: str, default: Any = _REQUIRED, *, minimum: int | None = None, below_minimum: str = "") -> Any:
        """``below_minimum``: what to tell a user whose value is too small, e.g. the value that means "off"."""
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key_of(name), f"expected an integer, got {type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.key_of(name), f"must be >= {minimum}, got {value}{below_minimum}")
        return value

    def get_float(self, name: str, default: Any = _REQUIRED, *, minimum: float | None = None) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.key_of(name), f"expected a number, got {type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.key_of(name), f"must be >= {minimum}, got {value}")
        return float(value)

    def get_bool(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key_of(name), f"expected true or false, got {type_name(value)} {value!r}")
        return value

    def get_mapping(self, name: str) -> dict[str, Any]:
        value = self._get(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError(self.key_of(name), f"expected a mapping, got {type_name(value)} {value!r}")
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(self.key_of(name), f"keys must be strings, got {type_name(k)} {k!r}")
        return dict(value)


def _candidates(raw: str, config_dir: Path | None) -> list[Path]:
    path = Path(raw).expanduser()
    if path.is_absolute():
        return [path]
    found = [Path.cwd() / path]
    if config_dir is not None and (config_dir / path).resolve() != found[0].resolve():
        found.append(config_dir / path)
    return found


def _resolve_existing(raw: str, key: str, config_dir: Path | None, *, want_file: bool = False) -> str:
    """Resolve a local path (cwd first, then the config's directory) or raise naming ``key``."""
    candidates = _candidates(raw, config_dir)
    for candidate in candidates:
        if candidate.exists():
            if want_file and not candidate.is_file():
                raise ConfigError(key, f"{raw!r} is not a file ({candidate})")
            return str(candidate.resolve())
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(key, f"path {raw!r} does not exist (looked in: {looked})")


def _model_location(raw: str, key: str, config_dir: Path | None) -> str:
    """A local path (resolved) or a hub id (unchanged).

    A value that starts with '.', '/' or '~' is meant as a path and must exist; any other
    value is a path if it exists locally, else it must look like a hub id ("org/name").
    """
    if raw.startswith((".", "/", "~")):
        return _resolve_existing(raw, key, config_dir)
    if any(c.exists() for c in _candidates(raw, config_dir)):
        return _resolve_existing(raw, key, config_dir)
    if not _HUB_ID.match(raw):
        raise ConfigError(key, f"{raw!r} is neither an existing local path nor a Hugging Face Hub id like 'org/name'")
    return raw


@functools.lru_cache(maxsize=1)
def training_argument_fields() -> frozenset[str]:
    """Names ``transformers.TrainingArguments`` accepts (imported lazily: transformers is slow to import)."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


# --------------------------------------------------------------------------------------------
# Sections


def _experiment(data: Any) -> ExperimentConfig:
    s = _Section(data, "experiment", ["name", "run_name", "tags"])
    run_name = s.get_str("run_name", ExperimentConfig.run_name)
    try:
        render_run_name(run_name, **{f: "x" for f in RUN_NAME_FIELDS})
    except ValueError as exc:
        raise ConfigError(s.key_of("run_name"), str(exc)) from None
    tags = {}
    for k, v in s.get_mapping("tags").items():
        if isinstance(v, (dict, list)) or v is None:
            raise ConfigError(f"experiment.tags.{k}", f"tag values must be scalars, got {type_name(v)} {v!r}")
        tags[k] = str(v).lower() if isinstance(v, bool) else str(v)
    name = s.get_str("name")
    try:
        check_length("the experiment name", name, EXPERIMENT_NAME_MAX_CHARS, where="MLflow's database")
    except NameTooLongError as exc:
        raise ConfigError(s.key_of("name"), str(exc)) from None
    return ExperimentConfig(name=name, run_name=run_name, tags=tags)


def _model(data: Any, config_dir: Path | None) -> ModelConfig:
    s = _Section(data, "model", ["name_or_path", "task", "num_labels", "tokenizer", "from_config", "config_overrides"])
    task = s.get_str("task", choices=TASKS)
    num_labels = s.get_int("num_labels", None, minimum=1)
    if num_labels is not None and task != "sequence-classification":
        raise ConfigError(s.key_of("num_labels"), f"only applies to task sequence-classification (task is {task!r})")
    tokenizer = s.get_str("tokenizer", None)
    overrides = s.get_mapping("config_overrides")
    # The model's config is saved with every checkpoint and with the final model, unredacted.
    if secret := next(iter(secret_keys_in(overrides)), None):
        raise ConfigError(f"{s.key_of('config_overrides')}.{secret}",
                          "names a secret, but the model config is stored with every checkpoint and the final model")
    return ModelConfig(
        name_or_path=_model_location(s.get_str("name_or_path"), s.key_of("name_or_path"), config_dir),
        task=task,
        num_labels=num_labels,
        tokenizer=None if tokenizer is None else _model_location(tokenizer, s.key_of("tokenizer"), config_dir),
        from_config=s.get_bool("from_config", ModelConfig.from_config),
        config_overrides=overrides,
    )


def _data(data: Any, config_dir: Path | None) -> DataConfig:
    s = _Section(
        data,
        "data",
        ["hub", "files", "text_column", "label_column", "max_length", "max_train_samples", "max_eval_samples"],
    )
    if s.has("hub") == s.has("files"):
        raise ConfigError("data", "set exactly one of data.hub (a Hub dataset) or data.files (local files)")
    hub = files = None
    if s.has("hub"):
        h = _Section(s.raw("hub"), "data.hub", ["name", "config", "split_train", "split_eval"])
        hub = HubDataConfig(
            name=h.get_str("name"),
            config=h.get_str("config", None),
            split_train=h.get_str("split_train", HubDataConfig.split_train),
            split_eval=h.get_str("split_eval", None),
        )
    else:
        f = _Section(s.raw("files"), "data.files", ["train", "eval", "format"])
        train = _resolve_existing(f.get_str("train"), "data.files.train", config_dir, want_file=True)
        eval_ = f.get_str("eval", None)
        if eval_ is not None:
            eval_ = _resolve_existing(eval_, "data.files.eval", config_dir, want_file=True)
        fmt = f.get_str("format", None, choices=sorted(set(DATA_FORMATS.values())))
        if fmt is None:
            fmt = _infer_format(train, "data.files.train")
            if eval_ is not None and _infer_format(eval_, "data.files.eval") != fmt:
                raise ConfigError("data.files.eval", f"has a different format than data.files.train ({fmt})")
        files = FilesDataConfig(train=train, eval=eval_, format=fmt)
    return DataConfig(
        hub=hub,
        files=files,
        text_column=s.get_str("text_column", DataConfig.text_column),
        label_column=s.get_str("label_column", DataConfig.label_column),
        max_length=s.get_int("max_length", DataConfig.max_length, minimum=1),
        max_train_samples=s.get_int("max_train_samples", None, minimum=1),
        max_eval_samples=s.get_int("max_eval_samples", None, minimum=1),
    )


def _infer_format(path: str, key: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(
            key,
            f"cannot infer the format of {path!r} from its extension; use {', '.join(DATA_FORMATS)} "
            "or set data.files.format (csv, json or parquet)",
        )
    return DATA_FORMATS[suffix]


def _training(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("training", f"expected a mapping of TrainingArguments fields, got {type_name(data)}")
    known = training_argument_fields()
    for name in data:
        key = f"training.{name}"
        if name in OWNED_TRAINING_KEYS:
            raise ConfigError(key, OWNED_TRAINING_KEYS[name])
        if name not in known:
            raise ConfigError(key, f"unknown TrainingArguments field{did_you_mean(str(name), known)}")
    _check_training_length(data)
    return dict(data)


def _check_training_length(data: Mapping) -> None:
    """A run that would train nothing is refused before it is created.

    transformers reads any negative ``max_steps`` as "use num_train_epochs" (its default is -1),
    but 0 as a step budget, and then still runs one step; ``num_train_epochs: 0`` gives a
    budget of 0 steps the same way. Only -1 stands for "unset", as in TrainingArguments' docs.
    """
    from transformers import TrainingArguments  # its defaults, not copies of them

    max_steps = data.get("max_steps", TrainingArguments.max_steps)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
        raise ConfigError("training.max_steps", f"must be a positive number of steps, or -1 (the default) to "
                                                f"train for training.num_train_epochs; got {max_steps!r}")
    epochs = data.get("num_train_epochs", TrainingArguments.num_train_epochs)
    if max_steps == -1 and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
        raise ConfigError("training.num_train_epochs",
                          f"must be a number above 0 (or set training.max_steps); got {epochs!r}")


def _upload(data: Any) -> UploadConfig:
    s = _Section(data, "upload", ["queue_size", "max_retries", "backoff_seconds", "background_parts"])
    return UploadConfig(
        queue_size=s.get_int("queue_size", UploadConfig.queue_size, minimum=1),
        max_retries=s.get_int("max_retries", UploadConfig.max_retries, minimum=0),
        backoff_seconds=s.get_float("backoff_seconds", UploadConfig.backoff_seconds, minimum=0.0),
        background_parts=s.get_int("background_parts", UploadConfig.background_parts, minimum=1),
    )


def _registered_model(data: Any) -> RegisteredModelConfig | None:
    if data is None:
        return None
    s = _Section(data, "registered_model", ["name", "alias"])
    alias = s.get_str("alias", RegisteredModelConfig.alias)
    if (problem := model_alias_problem(alias)) is not None:
        raise ConfigError(s.key_of("alias"), problem)
    name = s.get_str("name")
    if (problem := registered_model_name_problem(name)) is not None:
        raise ConfigError(s.key_of("name"), problem)
    return RegisteredModelConfig(name=name, alias=alias)


def _tracking(data: Any) -> TrackingConfig:
    s = _Section(data, "tracking", ["uri", "metrics_flush_seconds", "lease_seconds", "system_metrics"])
    uri = s.get_str("uri", None)
    if uri is not None and urlsplit(uri).password is not None:
        raise ConfigError(
            s.key_of("uri"),
            "must not contain a password; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment",
        )
    return TrackingConfig(
        uri=uri,
        metrics_flush_seconds=s.get_int("metrics_flush_seconds", TrackingConfig.metrics_flush_seconds, minimum=0),
        lease_seconds=s.get_int("lease_seconds", TrackingConfig.lease_seconds, minimum=MIN_LEASE_SECONDS),
        system_metrics=s.get_bool("system_metrics", TrackingConfig.system_metrics),
    )


def checkpoint_policy(data: Any, key: str = "checkpoints") -> CheckpointPolicy:
    """The ``checkpoints`` section (at ``key``) as a validated :class:`CheckpointPolicy`.

    Bad combinations are refused here, at load time, rather than discovered after hours of
    training; null means the default, so ``--set checkpoints.mode=null`` resets a key.
    """
    s = _Section(data, key, [f.name for f in dataclasses.fields(CheckpointPolicy)])
    # 0 would read as "keep none", which is never meant: unset is how to keep them all
    keep_all_hint = " (leave it unset to keep every checkpoint)"
    upload = s.get_str("upload", CheckpointPolicy.upload, choices=UPLOAD_MODES)
    every_n_steps = s.get_int("every_n_steps", None, minimum=1)
    save_last_k = s.get_int("save_last_k", None, minimum=1, below_minimum=keep_all_hint)
    save_top_k = s.get_int("save_top_k", None, minimum=1, below_minimum=keep_all_hint)
    monitor = s.get_str("monitor", None)
    mode = s.get_str("mode", CheckpointPolicy.mode, choices=MODES)
    path_template = s.get_str("path_template", CheckpointPolicy.path_template)

    if upload == "every_n_steps" and every_n_steps is None:
        raise ConfigError(s.key_of("every_n_steps"), "is required when upload is every_n_steps")
    if upload != "every_n_steps" and every_n_steps is not None:
        raise ConfigError(s.key_of("every_n_steps"), f"only applies when upload is every_n_steps (upload is {upload!r})")
    if save_top_k is not None and monitor is None:
        raise ConfigError(s.key_of("save_top_k"),
                          f"needs {s.key_of('monitor')}: the metric that ranks checkpoints, e.g. eval_loss")
    if upload == "best" and monitor is None:
        raise ConfigError(s.key_of("upload"), f"'best' needs {s.key_of('monitor')}: the metric that ranks checkpoints")
    if upload == "last":
        for name, value in (("save_last_k", save_last_k), ("save_top_k", save_top_k)):
            if value is not None:
                raise ConfigError(s.key_of(name),
                                  "does not apply when upload is 'last' (which keeps only the newest checkpoint); "
                                  "use upload: every_save with save_last_k/save_top_k instead")
    if upload == "best" and save_last_k is not None:
        raise ConfigError(s.key_of("save_last_k"),
                          "does not apply when upload is 'best' (only checkpoints entering the top save_top_k are "
                          "uploaded); use upload: every_save to also keep recent ones")
    try:
        validate_template(path_template)
    except ValueError as exc:
        raise ConfigError(s.key_of("path_template"), str(exc)) from None
    return CheckpointPolicy(upload=upload, every_n_steps=every_n_steps, save_last_k=save_last_k,
                            save_top_k=save_top_k, monitor=monitor, mode=mode, path_template=path_template)


def _check_policy_metrics(cfg: TrainConfig) -> None:
    """Metrics the policy ranks by or names checkpoints after must be ones the run logs at a save."""
    policy = cfg.checkpoints
    named = [("checkpoints.monitor", policy.monitor)] if policy.monitor is not None else []
    named += [("checkpoints.path_template", f) for f in template_fields(policy.path_template)
              if f not in ("step", "epoch")]
    for key, metric in named:
        problem = metric_problem(metric, has_eval_data=cfg.data.has_eval, evaluates=cfg.evaluates)
        if problem is not None:
            raise ConfigError(key, problem)


def _check_run_name(cfg: TrainConfig) -> None:
    """The rendered run name must fit MLflow's column and leave something for the run's directory.

    Checked on the name itself, not only the template: all its fields are known now but the
    timestamp, whose length never changes. Too long, MLflow's database refused it with SQL text;
    sanitized to nothing (``..``), the run was created before its directory name failed, and
    stayed RUNNING.
    """
    name = cfg.run_name(_SAMPLE_TIMESTAMP)
    try:
        check_length("the rendered run name", name, RUN_NAME_MAX_CHARS, where="MLflow's database")
        sanitize_component(name)
    except NameTooLongError as exc:
        raise ConfigError("experiment.run_name", str(exc)) from None
    except ValueError:
        raise ConfigError(
            "experiment.run_name",
            f"renders {name!r}, which leaves nothing to name the run's directory with "
            "(it needs at least one letter, digit or '_')",
        ) from None


# --------------------------------------------------------------------------------------------
# Entry points

TOP_LEVEL_KEYS = (
    "experiment", "model", "data", "training", "checkpoints", "upload",
    "output_root", "registered_model", "tracking", "log_final_model",
)  # fmt: skip


def build_config(data: Any, *, config_dir: Path | None = None) -> TrainConfig:
    """Validate an already-parsed config mapping (relative paths looked up in cwd, then ``config_dir``)."""
    s = _Section(data, "", TOP_LEVEL_KEYS)
    for required in ("experiment", "model", "data"):
        if not s.has(required):
            raise ConfigError(required, "section is required")
    cfg = TrainConfig(
        experiment=_experiment(s.raw("experiment")),
        model=_model(s.raw("model"), config_dir),
        data=_data(s.raw("data"), config_dir),
        training=_training(s.raw("training")),
        checkpoints=checkpoint_policy(s.raw("checkpoints")),
        upload=_upload(s.raw("upload")),
        output_root=s.get_str("output_root", TrainConfig.output_root),
        registered_model=_registered_model(s.raw("registered_model")),
        tracking=_tracking(s.raw("tracking")),
        log_final_model=s.get_bool("log_final_model", TrainConfig.log_final_model),
    )
    if cfg.registered_model is not None and not cfg.log_final_model:
        raise ConfigError("registered_model", "needs the final model: log_final_model must be true")
    _check_policy_metrics(cfg)
    _check_run_name(cfg)
    return cfg


def _parse_override_value(text: str) -> Any:
    """A scalar or list in the config dialect; anything else stays the raw string.

    Templates such as ``{epoch}-{step}`` are valid YAML *mappings*; nobody overriding a single
    key means a mapping, so mappings (and text that is not valid YAML) are taken literally.
    """
    if not text.strip():
        return None
    try:
        value = parse_yaml(text)
    except ConfigError:
        return text
    return text if isinstance(value, dict) else value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a parsed config (in place; also returned).

    Values are parsed as YAML in the config dialect, so ``3e-5`` is a float, ``true`` a bool,
    ``null`` (or nothing) clears a value, ``[a, b]`` is a list and ``{step}-x`` stays a string.
    Unknown keys are reported by the validation that follows, with their full dotted path.
    """
    for raw in overrides:
        key, sep, value_text = raw.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise ConfigError(
                None, f"malformed override {raw!r}: expected dotted.key=value, e.g. training.learning_rate=3e-5"
            )
        set_dotted(data, key, _parse_override_value(value_text))
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"needs a mapping here to set {key}, but the value is {child!r}")
        node = child
    node[parts[-1]] = value


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """The parsed YAML of ``path``; a missing, unreadable or invalid file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(None, f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(None, f"cannot read {what} {str(path)!r}: {exc}") from None
    return parse_yaml(text, source=str(path))


def read_config_mapping(path: Path) -> dict[str, Any]:
    """A training config file as a mapping, before overrides and validation."""
    data = read_yaml_file(path)
    if data is None:
        raise ConfigError(None, f"config file {str(path)!r} is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            None, f"config file {str(path)!r} must hold a mapping at the top level, got {type_name(data)}"
        )
    return data


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read, override and validate the config at ``path``.

    Raises:
        ConfigError: for a missing or unreadable file, invalid YAML (with file and line), a
            malformed override, or any invalid value (with its dotted key); ``source`` is set to
            the config path.
    """
    path = Path(path)
    data = read_config_mapping(path)
    try:
        apply_overrides(data, overrides)
        return build_config(data, config_dir=path.resolve().parent)
    except ConfigError as exc:
        if exc.source is None and exc.key is not None:
            exc.source = str(path)
        raise
