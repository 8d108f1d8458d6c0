"""What gc relies on of the trainer's (mltrainer's) storage layout and leases.

The services image does not ship mltrainer, so these facts are restated here; a unit test holds
them equal to mltrainer's own (``tests/unit/test_gc_plan.py``). Keep the two in step.

- A trainer holds a lease on its run in the tag ``mltrainer.lease`` (mltrainer.lease): JSON with
  ``renewed_at`` (unix s), ``lease_seconds`` and ``released``. Held = not released and not expired.
- Its checkpoints live under ``checkpoints/`` of the run's artifacts; a checkpoint is complete
  only once its ``manifest.json`` is stored (last). A manifest's ``files[].stored_at`` names the
  objects it uses (relative to the run's artifact root), which may sit in another, evicted,
  checkpoint's folder (dedup).
"""

from __future__ import annotations

import json

LEASE_TAG = "mltrainer.lease"
CHECKPOINTS_ROOT = "checkpoints"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def lease_state(tag_value: str | None, now: float) -> str:
    """``"held"``, ``"free"`` (released or expired) or ``"unknown"`` (no tag, or one gc cannot read).

    A renewal time ahead of our clock counts as held, as in mltrainer: refusing is the safe side.
    """
    if not tag_value:
        return "unknown"
    try:
        data = json.loads(tag_value)
        released = bool(data.get("released", False))
        expires = float(data["renewed_at"]) + float(data["lease_seconds"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return "unknown"
    return "free" if released or now >= expires else "held"


def manifest_references(text: bytes) -> set[str]:
    """Store paths (relative to the run's artifact root) a manifest uses; ``ValueError`` if unreadable."""
    try:
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported manifest format {data.get('format')!r}")
        return {str(entry["stored_at"]) for entry in data["files"]}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"unreadable manifest ({exc})") from None
