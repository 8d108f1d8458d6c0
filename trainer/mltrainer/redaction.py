"""What counts as a secret, and taking every secret out of what a run stores.

A secret is recognised three ways, and a :class:`Scrubber` applies all three to anything before
it is stored (run name, tags, params, text artifacts, the pickled TrainingArguments):

* by the name of its key: ``hub_token``, ``pwd``, ``aws_secret_access_key``, ``apiKey`` ...
  (:func:`is_secret_key`); the whole value goes, even a nested mapping;
* by its value, wherever it appears: every value the process knows to be secret (the config's
  secret-named values, and environment variables whose name is secret-named such as
  ``HF_TOKEN`` or ``MY_SERVICE_PASSWORD``) is replaced wherever it occurs as a substring;
* by its shape: tokens with a recognisable form (``hf_...``, ``ghp_...``, ``AKIA...``,
  ``sk-...``, PEM private keys), URL passwords, and ``password=...`` assignments inside text.

Values shorter than :data:`MIN_KNOWN_SECRET_LENGTH` are still removed under their own key, but
not searched for elsewhere: a two-character password would match all over ordinary text.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

REDACTED = "***REDACTED***"
MIN_KNOWN_SECRET_LENGTH = 6

# Key words that mark a secret. Matching is on whole words of the key (split on any separator
# and on camelCase), so "tokenizer", "max_tokens" and "author" do not match.
_SECRET_WORDS = frozenset(
    {"token", "password", "passwd", "pwd", "passphrase", "passcode", "secret", "secrets", "credential",
     "credentials", "auth", "authorization", "apikey", "accesskey", "privatekey", "secretkey"}
)
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
# One-word keys written without separators: "hftoken", "dbpassword", "clientsecret".
_SECRET_SUFFIXES = ("token", "password", "passwd", "secret", "apikey")
# A key ending in one of these describes a secret-related setting, not the secret itself
# ("pad_token_id", "auth_type", "token_length", "password_file": where a secret is is no secret).
_NON_SECRET_LAST_WORDS = frozenset(
    {"id", "ids", "type", "length", "len", "count", "size", "limit", "index", "strategy", "file", "path", "dir",
     "url", "uri", "host", "user", "username", "name", "mode", "method", "enabled", "required", "timeout", "ttl"}
)
# "eos_token", "pad_token", ...: tokenizer special tokens, not credentials.
_SPECIAL_TOKEN_WORDS = frozenset({"bos", "eos", "pad", "unk", "sep", "cls", "mask", "special"})
# Environment variables with a secret-looking name that are not secrets: the shell's working
# directories ("pwd"), which would otherwise scrub every local path out of what is stored.
_ENV_NOT_SECRET = frozenset({"PWD", "OLDPWD"})

# Credentials with a recognisable shape. The edges are "not a letter or digit" rather than \b, so
# a token joined by "_" ("run_hf_...") is still found.
_TOKEN_PATTERNS = [
    re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}"),  # Hugging Face
    re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])"),  # AWS access key id
    re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style secret key
    re.compile(r"(?<![A-Za-z0-9])(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"),  # GitHub
    re.compile(r"(?<![A-Za-z0-9])glpat-[A-Za-z0-9_-]{20,}"),  # GitLab
    re.compile(r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}"),  # Google API key
    re.compile(r"(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+"),  # JWT
    # The whole PEM block (to the end of the text when its END line was cut off).
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S),
]
# scheme://user:password@host -> keep everything but the password.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^/\s@]+)(?P<tail>@)")
# "pwd=abc", "api_key: abc", '"token": "abc"' inside a longer text (optim_args, a note, a command).
_ASSIGNMENT = re.compile(
    r"(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)(?P<sep>[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s,;&\"'{}\[\]]+)"
)


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a secret, e.g. ``hub_token``, ``pwd``, ``AWS_SECRET_ACCESS_KEY``."""
    words = _key_words(key)
    if not words or words[-1] in _NON_SECRET_LAST_WORDS:
        return False
    for i, word in enumerate(words):
        special_token = word == "token" and i > 0 and words[i - 1] in _SPECIAL_TOKEN_WORDS
        if word in _SECRET_WORDS and not special_token:
            return True
        if i > 0 and (words[i - 1], word) in _SECRET_PAIRS:
            return True
        if word.endswith(_SECRET_SUFFIXES) and word not in _SECRET_SUFFIXES:
            return True
    return False


def _unset(value: Any) -> bool:
    """An unset secret reveals nothing, and "None" says more than a redaction mark would."""
    return value is None or value == "" or value == "None"


class Scrubber:
    """Removes secrets from text and data before it is stored; see the module docstring for what.

    Build one per run with :meth:`for_run` (the config and the environment), or with explicit
    ``known`` values. Its repr never shows the values it holds.
    """

    __slots__ = ("_known",)

    def __init__(self, known: Iterable[str] = ()):
        values = set()
        for value in known:
            value = str(value)
            if len(value) >= MIN_KNOWN_SECRET_LENGTH and value != REDACTED:
                values.add(value)
                values.add(quote(value, safe=""))  # as it appears inside a URL
        # Longest first: a secret that contains another is replaced whole, not in pieces.
        self._known = tuple(sorted(values, key=len, reverse=True))

    @classmethod
    def for_run(cls, config: Any = None, environ: Mapping[str, str] | None = None) -> Scrubber:
        """The secrets of a run: those in its config tree and those in the (process) environment."""
        environ = os.environ if environ is None else environ
        return cls([*secrets_in_tree(config), *secrets_in_environment(environ)])

    def __repr__(self) -> str:
        return f"Scrubber(<{len(self._known)} known values>)"

    def text(self, value: str) -> str:
        """``value`` with every secret replaced in place by :data:`REDACTED`; the rest is kept."""
        for secret in self._known:
            if secret in value:
                value = value.replace(secret, REDACTED)
        value = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['tail']}", value)
        for pattern in _TOKEN_PATTERNS:
            value = pattern.sub(REDACTED, value)
        return _ASSIGNMENT.sub(_redact_assignment, value)

    def tree(self, data: Any) -> Any:
        """Copy of nested data with secrets removed: a secret-named key loses its whole value,
        every string (keys included) goes through :meth:`text`. Tuples stay tuples; dataclass
        instances are copied with their fields scrubbed; other objects are kept as they are."""
        if isinstance(data, Mapping):
            return {self._key(k): REDACTED if isinstance(k, str) and is_secret_key(k) and not _unset(v)
                    else self.tree(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            items = [self.tree(v) for v in data]
            if isinstance(data, list):
                return items
            return type(data)(*items) if hasattr(data, "_fields") else tuple(items)  # namedtuples keep their type
        if isinstance(data, str):
            return self.text(data)
        if dataclasses.is_dataclass(data) and not isinstance(data, type) and hasattr(data, "__dict__"):
            clean = copy.copy(data)
            clean.__dict__.update(self.tree(dict(data.__dict__)))
            return clean
        return data

    def flat(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A flat mapping (params, tags) with secrets removed; dotted keys are judged by every word."""
        return self.tree(dict(values))

    def _key(self, key: Any) -> Any:
        return self.text(key) if isinstance(key, str) else key


def _redact_assignment(match: re.Match) -> str:
    if not is_secret_key(match["key"]) or match["value"] == REDACTED:
        return match[0]
    return f"{match['key']}{match['sep']}{REDACTED}"


def secrets_in_tree(data: Any) -> list[str]:
    """Every value the tree marks as secret: the leaves under a secret-named key, and the values
    of ``key=value`` assignments with a secret-named key inside its strings."""
    found: list[str] = []

    def leaves(value: Any) -> None:
        if isinstance(value, Mapping):
            for v in value.values():
                leaves(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                leaves(v)
        elif not _unset(value) and not isinstance(value, bool):
            found.append(str(value))

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                (leaves if isinstance(k, str) and is_secret_key(k) else walk)(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            found.extend(m["value"] for m in _ASSIGNMENT.finditer(value) if is_secret_key(m["key"]))

    walk(data)
    return found


def secrets_in_environment(environ: Mapping[str, str]) -> list[str]:
    """Values of secret-named environment variables, and passwords inside URLs of any variable."""
    found = []
    for name, value in environ.items():
        if name not in _ENV_NOT_SECRET and is_secret_key(name) and not _unset(value):
            found.append(value)
        found.extend(m["password"] for m in _URL_PASSWORD.finditer(value))
    return found


def secret_keys_in(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the secret-named keys in nested data that hold a value (to refuse them)."""
    found = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if is_secret_key(str(k)) and not _unset(v):
                found.append(path)
            else:
                found.extend(secret_keys_in(v, path))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found.extend(secret_keys_in(v, f"{prefix}.{i}" if prefix else str(i)))
    return found
