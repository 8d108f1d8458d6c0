"""The search space: one :class:`ParamSpec` per searched config key, read from ``search.space``.

An entry is a range (``{type: float, low: 1.0e-5, high: 1.0e-3, log: true}``, ``type: int``
likewise, an optional ``step``) or a list of choices (``{type: categorical, choices: [8, 16]}``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mltrainer.config import _Section, type_name
from mltrainer.errors import ConfigError

TYPES = ("float", "int", "categorical")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
RANGE_ONLY_KEYS = ("low", "high", "log", "step")


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


def parse_param(key: str, data: Any) -> ParamSpec:
    """The ``search.space.<key>`` entry; a ConfigError names the entry's key at fault."""
    where = f"search.space.{key}"
    if not isinstance(data, Mapping):  # said here, with an example: the commonest slip is a bare value
        raise ConfigError(where, f"expected a mapping like {{type: float, low: 1.0e-5, high: 1.0e-3}}, "
                                 f"got {type_name(data)} {data!r}")
    s = _Section(data, where, PARAM_KEYS)
    kind = s.get_str("type", choices=TYPES)
    if kind == "categorical":
        for name in RANGE_ONLY_KEYS:
            if name in data:
                raise ConfigError(s.key_of(name), "does not apply to type categorical (use choices)")
        return ParamSpec(key, kind, choices=_choices(s))
    if "choices" in data:
        raise ConfigError(s.key_of("choices"), f"only applies to type categorical (type is {kind})")
    integer = kind == "int"
    low, high = _bound(s, "low", kind), _bound(s, "high", kind)
    if (high < low) if integer else (high <= low):
        raise ConfigError(s.key_of("high"), f"must be {'>=' if integer else '>'} low ({low}), got {high}")
    log = s.get_bool("log", False)
    if log and low <= 0:
        raise ConfigError(s.key_of("low"), f"must be > 0 with log: true, got {low}")
    step = _number(s, "step", kind, None)
    if step is not None:
        if step <= 0:
            raise ConfigError(s.key_of("step"), f"must be > 0, got {step}")
        if log and not integer:
            raise ConfigError(s.key_of("step"), "cannot be combined with log: true for type float")
    return ParamSpec(key, kind, low=low, high=high, log=log, step=step)


def _bound(s: _Section, name: str, kind: str) -> float | int:
    if not s.has(name):
        raise ConfigError(s.key_of(name), f"is required for type {kind}")
    return _number(s, name, kind, None)


def _number(s: _Section, name: str, kind: str, default: Any) -> Any:
    """An int (type int) or a number (type float), kept as written: ``low: 0`` stays the int 0,
    because the space's JSON (a study's identity, see SweepSpec.identity_hash) must not change."""
    if kind == "int":
        return s.get_int(name, default)
    s.get_float(name, default)  # validates: a number, not a bool
    return s.raw(name, default)


def _choices(s: _Section) -> tuple:
    choices = s.raw("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(s.key_of("choices"), f"expected a non-empty list, got {type_name(choices)} {choices!r}")
    for c in choices:
        if c is not None and not isinstance(c, (str, int, float, bool)):
            raise ConfigError(s.key_of("choices"), f"choices must be scalars, got {type_name(c)} {c!r}")
    if len({json.dumps(c) for c in choices}) != len(choices):
        raise ConfigError(s.key_of("choices"), f"choices must be distinct, got {choices!r}")
    return tuple(choices)
