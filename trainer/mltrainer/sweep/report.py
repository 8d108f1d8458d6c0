"""The sweep's outcome as the table the CLI prints: one row per trial, the best one starred."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .parent import TrialRecord
from .spec import SweepSpec


def format_trials(spec: SweepSpec, records: Sequence[TrialRecord], best: TrialRecord | None) -> str:
    keys = list(spec.space)
    header = ["trial", "state", spec.metric, "run id", *keys]
    rows = []
    for r in records:
        rows.append([f"{r.number}{' *' if best is not None and r is best else ''}", r.state,
                     "" if r.value is None else f"{r.value:.6g}", r.run_id or "-",
                     *(_short(r.values.get(k)) for k in keys)])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
