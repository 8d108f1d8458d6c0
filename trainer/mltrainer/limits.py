"""How long the names we hand to MLflow, the database and the object store may be.

Each limit is one the stack really enforces, and each is checked when the config loads, so a
name that cannot be stored fails in a second with the key at fault, before any run exists,
instead of as a database error with SQL text after the run was created (run name), or as a
checkpoint the store accepts but can never list or read back (a key component over 255 bytes).

MLflow's own client checks are looser than its database: it lets an experiment name of up to
500 characters through to a ``VARCHAR(256)`` column, and does not check a run name at all
before it reaches a ``VARCHAR(250)``. The limits below are the columns'.
"""

from __future__ import annotations

import posixpath
import re

# Columns of MLflow's SQL schema (mlflow/store/*/dbmodels/models.py); PostgreSQL counts characters.
RUN_NAME_MAX_CHARS = 250  # runs.name
EXPERIMENT_NAME_MAX_CHARS = 256  # experiments.name
REGISTERED_MODEL_NAME_MAX_CHARS = 256  # registered_models.name

# Object keys. A key's component (between '/') longer than 255 bytes is stored by SeaweedFS but
# can never be listed or read back (its filer answers 500); a whole S3 key is at most 1024 bytes.
PATH_COMPONENT_MAX_BYTES = 255
S3_KEY_MAX_BYTES = 1024
# A checkpoint file's key is <server artifact root>/<experiment id>/<run id>/artifacts/ +
# checkpoints/<rendered template> + /<file inside the checkpoint>. The server's root is not known
# to the client ("artifacts/" on our stack), so a quarter of the key is kept for it with the ids
# (~64 bytes of those), and a quarter for the Trainer's file names ("rng_state_15.pth",
# "global_step100/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"): the checkpoint's store
# path gets the half in between.
RUN_ARTIFACT_PREFIX_RESERVE_BYTES = 256
CHECKPOINT_FILE_RESERVE_BYTES = 256
CHECKPOINT_PATH_MAX_BYTES = S3_KEY_MAX_BYTES - RUN_ARTIFACT_PREFIX_RESERVE_BYTES - CHECKPOINT_FILE_RESERVE_BYTES


class NameTooLongError(ValueError):
    """A name exceeds what the server or the store can hold."""


def check_length(what: str, value: str, limit: int, *, where: str) -> None:
    """Raise :class:`NameTooLongError` when ``value`` has more than ``limit`` characters."""
    if len(value) > limit:
        raise NameTooLongError(
            f"{what} is {len(value)} characters long; {where} holds at most {limit}: {preview(value)}"
        )


def check_store_path(path: str, *, what: str = "checkpoint store path") -> None:
    """A store path (``checkpoints/step-00000040``) must fit an object key, component by component."""
    for part in path.split("/"):
        size = len(part.encode("utf-8"))
        if size > PATH_COMPONENT_MAX_BYTES:
            raise NameTooLongError(
                f"{what} has a component of {size} bytes; the store reads back at most "
                f"{PATH_COMPONENT_MAX_BYTES} per component: {preview(part)}"
            )
    size = len(path.encode("utf-8"))
    if size > CHECKPOINT_PATH_MAX_BYTES:
        raise NameTooLongError(
            f"{what} is {size} bytes long; at most {CHECKPOINT_PATH_MAX_BYTES} fit in an S3 key "
            f"({S3_KEY_MAX_BYTES} bytes) beside the run's artifact prefix and the checkpoint's file names: "
            f"{preview(path)}"
        )


def registered_model_name_problem(name: str) -> str | None:
    """Why MLflow's registry would refuse ``name``, or ``None`` (its checks, plus the column's length)."""
    if any(c in name for c in "/:"):
        return f"{name!r} contains '/' or ':', which MLflow does not allow in a model name"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        return f"{name!r} reads as a different path ({norm!r}); MLflow refuses such model names"
    if len(name) > REGISTERED_MODEL_NAME_MAX_CHARS:
        return (f"is {len(name)} characters long; MLflow's registry holds at most "
                f"{REGISTERED_MODEL_NAME_MAX_CHARS}: {preview(name)}")
    return None


_MLFLOW_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


def model_alias_problem(alias: str) -> str | None:
    """Why MLflow's registry would refuse ``alias`` for a model version, or ``None``.

    'latest' and 'v<number>' are refused by MLflow because they already mean a version.
    """
    if not _MLFLOW_ALIAS.match(alias) or alias.lower() == "latest" or re.match(r"^[vV]\d+$", alias):
        return f"{alias!r} is not a valid MLflow alias (letters, digits, '_' and '-'; not 'latest' or 'v<number>')"
    return None


def preview(value: str, keep: int = 40) -> str:
    """``repr`` of ``value``, its middle elided when long: error messages stay one readable line."""
    return repr(value) if len(value) <= 2 * keep + 5 else repr(f"{value[:keep]}...{value[-keep:]}")
