"""Turn a nested config into MLflow params: flat, secret-free, within MLflow's size limits.

MLflow params are flat ``str -> str`` with a 250-character key and 6000-character value limit;
a longer value makes ``log_params`` fail the whole batch. Secrets must never become params or
tags, so redaction looks both at key names (``hub_token``, ``aws_secret_access_key``) and at
values that look like credentials wherever they appear (``hf_...``, ``AKIA...``, URLs with a
password).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"
MLFLOW_MAX_PARAM_VALUE = 6000
MLFLOW_MAX_PARAM_KEY = 250

_SCALARS = (str, int, float, bool, type(None))

# Key words that mark a secret. Matching is on whole words of the key (split on any separator
# and on camelCase), so "tokenizer", "max_tokens" and "author" do not match.
_SECRET_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "secret",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "apikey",
        "accesskey",
        "privatekey",
    }
)
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
# A key ending in one of these describes a secret-related setting, not the secret itself
# ("pad_token_id", "auth_type", "token_length").
_NON_SECRET_LAST_WORDS = frozenset(
    {"id", "ids", "type", "length", "len", "count", "size", "limit", "index", "strategy"}
)
# "eos_token", "pad_token", ...: tokenizer special tokens, not credentials.
_SPECIAL_TOKEN_WORDS = frozenset({"bos", "eos", "pad", "unk", "sep", "cls", "mask", "special"})

_SECRET_VALUE_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face token
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style secret key
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}"),  # GitHub
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
# scheme://user:password@host -> keep everything but the password.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^/\s@]+)(?P<tail>@)")


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


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a secret, e.g. ``hub_token``, ``apiKey``, ``AWS_SECRET_ACCESS_KEY``."""
    words = _key_words(key)
    if not words or words[-1] in _NON_SECRET_LAST_WORDS:
        return False
    for i, word in enumerate(words):
        if word in _SECRET_WORDS and not (word == "token" and i > 0 and words[i - 1] in _SPECIAL_TOKEN_WORDS):
            return True
        if i > 0 and (words[i - 1], word) in _SECRET_PAIRS:
            return True
    return False


def redact_value(value: str) -> str:
    """Redact a value that looks like a credential, wherever it appears in the string.

    A URL password is replaced in place (``https://user:***REDACTED***@host``) so the URL stays
    useful; any other recognized token redacts the whole value.
    """
    value = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['tail']}", value)
    if any(p.search(value) for p in _SECRET_VALUE_PATTERNS):
        return REDACTED
    return value


def _redact_one(key: str, value: Any) -> Any:
    if is_secret_key(key) and value not in (None, "", "None"):  # an unset secret reveals nothing
        return REDACTED
    return redact_value(value) if isinstance(value, str) else value


def redact(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a flat mapping with secret-named keys and secret-looking values redacted."""
    return {k: _redact_one(k, v) for k, v in flat.items()}


def redact_tree(d: Any) -> Any:
    """Copy of a nested structure with secrets redacted, for logging the full config artifact.

    A secret-named key has its whole value replaced, even a nested mapping.
    """
    if isinstance(d, Mapping):
        return {
            k: REDACTED if is_secret_key(str(k)) and v not in (None, "", "None") else redact_tree(v)
            for k, v in d.items()
        }
    if isinstance(d, (list, tuple)):
        return [redact_tree(v) for v in d]
    if isinstance(d, str):
        return redact_value(d)
    return d


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
