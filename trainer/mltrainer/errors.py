"""Exceptions shared across mltrainer.

Errors about user input must say *which* input is wrong, so every configuration problem is a
``ConfigError`` carrying the dotted key at fault (``training.learning_rate``,
``checkpoints.save_top_k``) and, once known, the file it came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent.

    Attributes:
        key: dotted path of the offending key (``"data.files.train"``), or ``None`` for
            problems with the file as a whole (missing file, invalid YAML).
        message: what is wrong and, where possible, how to fix it.
        source: the config file the key came from, when known; set by ``load_config``.
    """

    def __init__(self, key: str | None, message: str, *, source: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        super().__init__(str(self))

    def __reduce__(self):  # keep key/source when pickled across processes
        return (type(self), (self.key, self.message), {"source": self.source})

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join([*parts, self.message])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``choices`` to ``word``, or ``""`` if none is close."""
    matches = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]}?" if matches else ""


def unknown_key_error(key: str, choices: Iterable[str], *, what: str = "unknown key") -> ConfigError:
    """A ``ConfigError`` for ``key`` (dotted) that is not one of ``choices`` (leaf names)."""
    leaf = key.rsplit(".", 1)[-1]
    choices = sorted(choices)
    return ConfigError(key, f"{what}{did_you_mean(leaf, choices)} (allowed: {', '.join(choices)})")
