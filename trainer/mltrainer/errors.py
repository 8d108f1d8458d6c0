"""Exceptions shared across mltrainer, and the exit code each one ends the CLI with.

Every error a user can act on derives from :class:`MltrainerError`, which carries its exit code
and the label the CLI prints before its message (``config error: ...``). The CLI catches that base
class only: an exception of any other type (a bare ``ValueError`` included) is a bug in mltrainer
or a library, and ends with Python's traceback and exit code 1 instead of posing as bad input.
Errors that *are* bad input (TrainingArguments refusing a value, a column the data lacks) are
converted to :class:`ConfigError` where we hand the input over (train.py, modeling.py).

Errors about user input must say *which* input is wrong, so every configuration problem is a
``ConfigError`` carrying the dotted key at fault (``training.learning_rate``,
``checkpoints.save_top_k``) and, once known, the file it came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# The CLI's exit codes (README, "Exit codes"). 1 stays Python's own: an unexpected exception.
EXIT_OK = 0
EXIT_CONFIG = 2  # bad config, bad command-line value, bad data
EXIT_TRACKING = 3  # the tracking server is unreachable, refuses the credentials or a request
EXIT_UPLOAD = 4  # checkpoints could not be stored (they are still on local disk)
EXIT_RESUME = 5  # a resume cannot proceed (no such run or checkpoint, run in use)
EXIT_DAMAGED = 6  # checkpoints --verify: an object of a complete checkpoint is missing or has the wrong size
EXIT_MONITOR = 7  # training finished, but checkpoints.monitor was never logged at a save: nothing was ranked


class MltrainerError(Exception):
    """An error the user can act on: the CLI prints ``<label>: <message>`` and exits with ``exit_code``.

    Subclasses set both as class attributes. ``exit_code`` 0 is an outcome, not a failure: the
    message goes to stdout without a label.
    """

    exit_code: int = 1
    label: str = "error"


class ConfigError(MltrainerError, ValueError):  # still a ValueError: callers that validate values catch it as one
    """A configuration value is missing, unknown, mistyped or inconsistent.

    Attributes:
        key: dotted path of the offending key (``"data.files.train"``), or ``None`` for
            problems with the file as a whole (missing file, invalid YAML).
        message: what is wrong and, where possible, how to fix it.
        source: the config file the key came from, when known; set by ``load_config``.
    """

    exit_code = EXIT_CONFIG
    label = "config error"

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


class TrackingError(MltrainerError):
    """The tracking server is unreachable, rejects the credentials, or cannot be used."""

    exit_code = EXIT_TRACKING
    label = "tracking error"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``choices`` to ``word``, or ``""`` if none is close."""
    matches = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]}?" if matches else ""


def unknown_key_error(key: str, choices: Iterable[str], *, what: str = "unknown key") -> ConfigError:
    """A ``ConfigError`` for ``key`` (dotted) that is not one of ``choices`` (leaf names)."""
    leaf = key.rsplit(".", 1)[-1]
    choices = sorted(choices)
    return ConfigError(key, f"{what}{did_you_mean(leaf, choices)} (allowed: {', '.join(choices)})")
