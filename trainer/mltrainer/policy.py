"""Which checkpoints to upload and which to keep: the layout (retention) policy.

The vocabulary is Lightning ``ModelCheckpoint``'s, which users already know: ``save_top_k``
with ``monitor``/``mode`` keeps the best K, ``save_last_k`` keeps the most recent K, and
``path_template`` names checkpoints like ``filename`` does. Bad combinations are refused when
the config is loaded (``config.checkpoint_policy``, with every other section), not discovered
after hours of training.

``RetentionState`` is the policy's memory: what is in the store right now. It is pure data
(JSON round-trip via ``to_dict``/``from_dict``) so it can be saved with each checkpoint and
restored on resume, and so every decision here is testable without a server. It decides; the
uploader acts (deletes) and then reports back with :meth:`RetentionState.mark_deleted`.

Ranking rules (used everywhere a "best" is needed):

* Only finite numeric values of ``monitor`` rank. A checkpoint without the metric (no eval at
  that save) or with NaN never counts as "best" and is kept only by the other rules.
* Ties on the metric go to the **earlier step**: a later checkpoint has to be strictly better
  to displace an earlier one, so the set of best checkpoints does not churn on plateaus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .naming import DEFAULT_PATH_TEMPLATE

UPLOAD_MODES = ("every_save", "every_n_steps", "last", "best")
MODES = ("min", "max")
STATE_FORMAT = 1


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to upload a checkpoint and how many to keep in the store.

    ``upload``:
        * ``every_save`` - upload every checkpoint the Trainer saves.
        * ``every_n_steps`` - upload saves at steps divisible by ``every_n_steps``, and the
          final save, so the end of training is always in the store.
        * ``last`` - upload every save but keep only the newest: the store always holds one
          resumable checkpoint, at the cost of one upload per save. (Uploading only the final
          save would leave nothing to resume from after a crash.)
        * ``best`` - upload a save only if it enters the best ``save_top_k`` (default 1) by
          ``monitor``; keeps only those. Nothing is uploaded for saves without the metric,
          except the final save when nothing at all is stored: a run whose metric never
          appeared still ends with its trained state in the store.

    ``save_last_k``/``save_top_k`` (``every_save`` and ``every_n_steps``): keep the union of
    the K most recent and the K best. Both unset means keep everything. Whatever they say, the
    newest checkpoint, the current best and the one training resumed from are never deleted.
    """

    upload: str = "every_save"
    every_n_steps: int | None = None
    save_last_k: int | None = None
    save_top_k: int | None = None
    monitor: str | None = None
    mode: str = "min"
    path_template: str = DEFAULT_PATH_TEMPLATE

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def keep_last_k(self) -> int | None:
        """How many of the newest checkpoints retention keeps (``None``: not a criterion)."""
        return 1 if self.upload == "last" else self.save_last_k

    @property
    def keep_top_k(self) -> int | None:
        """How many of the best checkpoints retention keeps (``None``: not a criterion)."""
        if self.upload == "best":
            return self.save_top_k or 1
        return self.save_top_k

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last_k is None and self.keep_top_k is None


def _rankable(value: Any) -> float | None:
    """The metric as a float if it can be ranked (finite number, not bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class StoredCheckpoint:
    """One checkpoint present in the store."""

    path: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": self.step, "metrics": dict(self.metrics)}


@dataclass
class RetentionState:
    """What is in the store now, and which checkpoint training resumed from.

    ``stored`` is kept in recording order; decisions sort explicitly, so order never matters.
    """

    stored: list[StoredCheckpoint] = field(default_factory=list)
    resumed_from: str | None = None

    # -- recording -------------------------------------------------------------------------

    def record_stored(self, path: str, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record that the checkpoint at ``path`` is now complete in the store.

        Only rankable metrics (finite numbers) are kept: they are all the policy needs, and
        they keep the state strictly JSON-safe. Recording the same path again (a retried or
        resumed upload) replaces the earlier entry instead of duplicating it.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        clean = {}
        for name, value in (metrics or {}).items():
            if (rankable := _rankable(value)) is not None:
                clean[str(name)] = rankable
        entry = StoredCheckpoint(path=path, step=step, metrics=clean)
        for i, existing in enumerate(self.stored):
            if existing.path == path:
                self.stored[i] = entry
                return
        self.stored.append(entry)

    def mark_deleted(self, path: str) -> bool:
        """Forget ``path`` after the uploader deleted it; ``False`` if it was not recorded.

        Idempotent, so a deletion retried after a crash is harmless. Refuses to forget the
        checkpoint training resumed from: nothing should have deleted it.
        """
        if path == self.resumed_from:
            raise ValueError(f"refusing to forget {path!r}: it is the checkpoint training resumed from")
        before = len(self.stored)
        self.stored = [c for c in self.stored if c.path != path]
        return len(self.stored) != before

    # -- queries ---------------------------------------------------------------------------

    def _by_recency(self) -> list[StoredCheckpoint]:
        """Newest first: highest step; for equal steps, the later recorded one."""
        order = {id(c): i for i, c in enumerate(self.stored)}
        return sorted(self.stored, key=lambda c: (c.step, order[id(c)]), reverse=True)

    def _ranked(self, policy: CheckpointPolicy) -> list[StoredCheckpoint]:
        """Checkpoints that have the monitored metric, best first (ties: earlier step first)."""
        if policy.monitor is None:
            return []
        sign = 1.0 if policy.mode == "min" else -1.0
        ranked = [c for c in self.stored if policy.monitor in c.metrics]
        return sorted(ranked, key=lambda c: (sign * c.metrics[policy.monitor], c.step, c.path))

    def latest(self) -> str | None:
        """Store path of the newest stored checkpoint, or ``None`` if nothing is stored."""
        newest = self._by_recency()
        return newest[0].path if newest else None

    def best(self, policy: CheckpointPolicy) -> str | None:
        """Store path of the best checkpoint by ``policy.monitor``/``mode``, or ``None``."""
        ranked = self._ranked(policy)
        return ranked[0].path if ranked else None

    def paths(self) -> list[str]:
        """Stored paths, oldest step first."""
        return [c.path for c in reversed(self._by_recency())]

    # -- decisions -------------------------------------------------------------------------

    def should_upload(
        self, policy: CheckpointPolicy, step: int, is_final: bool, metrics: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether the checkpoint saved at ``step`` should be uploaded at all.

        ``every_save`` and ``last`` upload every save (``last`` then keeps only the newest).
        ``every_n_steps`` uploads steps divisible by N and always the final save. ``best``
        uploads only when the monitored metric is present and would place the checkpoint in
        the best ``keep_top_k`` of what is stored: strictly better than the current K-th, since
        ties go to the earlier step (see module docstring); and the final save when the store
        holds nothing, so that a metric that never appeared does not leave the run empty-handed.
        """
        if policy.upload in ("every_save", "last"):
            return True
        if policy.upload == "every_n_steps":
            assert policy.every_n_steps is not None  # guaranteed by config.checkpoint_policy
            return is_final or step % policy.every_n_steps == 0
        value = _rankable((metrics or {}).get(policy.monitor))  # upload == "best"
        if value is None:
            return is_final and not self.stored
        ranked = [c for c in self._ranked(policy) if c.step != step]
        k = policy.keep_top_k or 1
        if len(ranked) < k:
            return True
        kth = ranked[k - 1].metrics[policy.monitor]
        return value < kth if policy.mode == "min" else value > kth

    def evictions(self, policy: CheckpointPolicy) -> list[str]:
        """Store paths to delete now, oldest step first.

        Kept: the ``keep_last_k`` newest, the ``keep_top_k`` best (checkpoints without the
        monitored metric never count as best), and always the newest, the current best and
        ``resumed_from``. Everything else goes. A policy that keeps everything evicts nothing.
        Pure: the state changes only when the caller reports a deletion via ``mark_deleted``.
        """
        if policy.keeps_everything:
            return []
        newest = self._by_recency()
        ranked = self._ranked(policy)
        keep = {c.path for c in newest[:1]} | {c.path for c in ranked[:1]}
        if self.resumed_from is not None:
            keep.add(self.resumed_from)
        if policy.keep_last_k is not None:
            keep.update(c.path for c in newest[: policy.keep_last_k])
        if policy.keep_top_k is not None:
            keep.update(c.path for c in ranked[: policy.keep_top_k])
        return [c.path for c in reversed(newest) if c.path not in keep]

    # -- serialization ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, saved with checkpoints so a resumed run knows what is stored."""
        return {
            "format": STATE_FORMAT,
            "stored": [c.to_dict() for c in self.stored],
            "resumed_from": self.resumed_from,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetentionState:
        """Inverse of :meth:`to_dict`. Raises ``ValueError`` saying what is malformed."""
        if not isinstance(d, Mapping):
            raise ValueError(f"retention state must be a mapping, got {type(d).__name__}")
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"retention state: unsupported format {d.get('format')!r} (expected {STATE_FORMAT})")
        stored_raw = d.get("stored")
        if not isinstance(stored_raw, list):
            raise ValueError("retention state: 'stored' must be a list")
        resumed_from = d.get("resumed_from")
        if resumed_from is not None and not isinstance(resumed_from, str):
            raise ValueError(f"retention state: 'resumed_from' must be a string or null, got {resumed_from!r}")
        state = cls(resumed_from=resumed_from)
        for i, item in enumerate(stored_raw):
            if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
                raise ValueError(f"retention state: stored[{i}] needs a string 'path', got {item!r}")
            metrics = item.get("metrics", {})
            if not isinstance(metrics, Mapping):
                raise ValueError(f"retention state: stored[{i}].metrics must be a mapping")
            try:
                state.record_stored(item["path"], item.get("step"), metrics)
            except ValueError as exc:
                raise ValueError(f"retention state: stored[{i}]: {exc}") from None
        return state
