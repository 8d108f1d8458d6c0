"""Turn a nested config into MLflow params: flat, and within MLflow's size limits.

MLflow params are flat ``str -> str`` with a 250-character key and 6000-character value limit;
a longer value makes ``log_params`` fail the whole batch. Taking secrets out is
:mod:`mltrainer.redaction`'s job, done before anything here is logged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

MLFLOW_MAX_PARAM_VALUE = 6000
MLFLOW_MAX_PARAM_KEY = 250

_SCALARS = (str, int, float, bool, type(None))


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten nested mappings into ``{"a.b.c": "value"}`` with string values.

    Lists of scalars become one JSON string (``"[1, 2]"``): one param stays readable and
    comparable across runs. Lists containing mappings or lists are indexed (``key.0.name``).
    ``None`` becomes ``"None"``; empty mappings become ``"{}"`` so the key is not lost.
    """
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            if not value and key:
                out[key] = "{}"
            for k, v in value.items():
                walk(v, f"{key}{sep}{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            if all(isinstance(v, _SCALARS) for v in value):
                out[key] = json.dumps(list(value), default=str)
            else:
                for i, v in enumerate(value):
                    walk(v, f"{key}{sep}{i}")
        else:
            out[key] = str(value)

    if not isinstance(d, Mapping):
        raise TypeError(f"flatten expects a mapping, got {type(d).__name__}")
    walk(d, prefix)
    return out


def shorten_key(key: str, limit: int = MLFLOW_MAX_PARAM_KEY) -> str:
    """``key`` if it fits, else its head plus ``~`` and 8 hex chars of its sha256 (exactly ``limit`` long).

    The hash keeps distinct long keys distinct, and the same key always maps to the same name.
    """
    if len(key) <= limit:
        return key
    suffix = "~" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return key[: limit - len(suffix)] + suffix


def truncate_values(
    flat: Mapping[str, str],
    limit: int = MLFLOW_MAX_PARAM_VALUE,
    marker: str = "...[truncated]",
    key_limit: int = MLFLOW_MAX_PARAM_KEY,
) -> tuple[dict[str, str], list[str]]:
    """Fit params into MLflow's limits instead of failing the whole ``log_params`` batch.

    A value longer than ``limit`` is cut so that value plus ``marker`` is exactly ``limit``
    long; a key longer than ``key_limit`` is shortened with :func:`shorten_key`.

    Returns:
        ``(params, changed)`` where ``changed`` lists, in input order, the original keys whose
        value was truncated or whose key was shortened (for a warning).
    """
    if len(marker) >= limit:
        raise ValueError(f"marker {marker!r} must be shorter than limit {limit}")
    out: dict[str, str] = {}
    changed: list[str] = []
    for key, value in flat.items():
        value = str(value)
        new_key = shorten_key(key, key_limit)
        if len(value) > limit:
            value = value[: limit - len(marker)] + marker
        if new_key != key or value != str(flat[key]):
            changed.append(key)
        if new_key in out:
            raise ValueError(f"params {key!r} and another key both map to {new_key!r}")
        out[new_key] = value
    return out, changed
