"""The ``--older-than`` age: MLflow gc's spelling (``30d``, ``12h``, ``1d12h``, ``90m``, ``0s``)."""

from __future__ import annotations

import re
from datetime import timedelta

# Nothing younger than this is removed: a deleted run can still be restored from the UI for
# a month, and an in-flight upload is never that old.
DEFAULT_OLDER_THAN = "30d"

_AGE = re.compile(r"^(?:(?P<days>\d+(?:\.\d+)?)d)?(?:(?P<hours>\d+(?:\.\d+)?)h)?"
                  r"(?:(?P<minutes>\d+(?:\.\d+)?)m)?(?:(?P<seconds>\d+(?:\.\d+)?)s)?$")


def parse_age(text: str) -> float:
    """Seconds in ``text``; ``ValueError`` naming the value and the accepted form otherwise."""
    match = _AGE.match(text.strip())
    if not text.strip() or match is None or not any(match.groupdict().values()):
        raise ValueError(f"--older-than {text!r} is not an age: use days, hours, minutes, seconds "
                         "such as 30d, 12h, 1d12h, 90m or 0s")
    return timedelta(**{k: float(v) for k, v in match.groupdict().items() if v}).total_seconds()
