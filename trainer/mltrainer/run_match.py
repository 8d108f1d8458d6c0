"""Which runs are runs of a config: exact run-name matching for ``--resume latest``.

MLflow's search filter only offers ``LIKE``, where ``_`` and ``%`` are wildcards (and, on
PostgreSQL, ``\\`` escapes), and run names are free text: a name like ``bert_v1`` used as a
pattern also matches ``bertXv1`` and another team's run. So the server is asked with a pattern
that can only match more (every special character, and the quote, becomes ``_``), and each
candidate is then checked here against the exact name, with only the timestamp left open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# LIKE wildcards, PostgreSQL's LIKE escape, and the filter's own quote: each stands for itself
# in the name, and "_" (any one character) covers it without any quoting rule to get right.
_LIKE_SPECIAL = re.compile(r"[\\%_']")


@dataclass(frozen=True)
class RunNamePattern:
    """Literal name pieces with a timestamp (matched by ``timestamp_regex``) between each two."""

    pieces: tuple[str, ...]
    timestamp_regex: str

    @classmethod
    def from_rendered(cls, rendered: str, placeholder: str, timestamp_regex: str) -> RunNamePattern:
        """``rendered`` is the run name rendered with ``placeholder`` as its timestamp."""
        return cls(tuple(rendered.split(placeholder)), timestamp_regex)

    def matches(self, name: str) -> bool:
        regex = self.timestamp_regex.join(re.escape(piece) for piece in self.pieces)
        return re.fullmatch(regex, name) is not None

    def like(self) -> str:
        """A ``LIKE`` pattern matching every name :meth:`matches` accepts (and possibly more)."""
        return "%".join(_LIKE_SPECIAL.sub("_", piece) for piece in self.pieces)

    def search_filter(self) -> str:
        return f"attributes.run_name LIKE '{self.like()}'"

    def __str__(self) -> str:
        return "<timestamp>".join(self.pieces)
