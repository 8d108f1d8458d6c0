"""What an MLflow server error says, fit for a user: no database driver text, no SQL.

The MLflow server puts the database's own exception into some error messages (a unique
violation: ``(psycopg2.errors.UniqueViolation) duplicate key ... [SQL: INSERT INTO ...]
[parameters: ...]``), and those messages reach the client verbatim. Table names, queries and
parameter values are nobody's business at the terminal; the error code and MLflow's own words are.
"""

from __future__ import annotations

import re

# Where the database's text starts inside an MLflow message.
# Case-sensitive on purpose: SQL as SQLAlchemy prints it is upper case, and prose that says
# "select ... from" must not be cut.
_DATABASE_TEXT = re.compile(
    r"\(\s*(?:psycopg2?|sqlalchemy|sqlite3|pymysql|MySQLdb)\b|\[SQL:|\[parameters:|\bDETAIL:|"
    r"\bsqlalche\.me\b|\b(?:INSERT INTO|UPDATE \S+ SET|SELECT \S.* FROM|DELETE FROM)\b"
)
# What MLflow puts right before the database's text ("... already exists. Error: (psycopg2...").
_TRAILING_LEAD_IN = re.compile(r"[\s.:;,(-]*(?:\bError\b)?[\s.:;,(-]*$", re.IGNORECASE)


def without_database_text(message: str) -> str:
    """``message`` cut where database text starts; its first line otherwise."""
    match = _DATABASE_TEXT.search(message)
    kept = message[:match.start()] if match else message
    kept = (kept.strip().splitlines() or [""])[0]
    if match:
        kept = _TRAILING_LEAD_IN.sub("", kept)
        kept = f"{kept} (database details withheld)" if kept else "database error (details withheld)"
    return kept


def describe(exc: BaseException) -> str:
    """One line for an MLflow exception: its error code and its message, without database text."""
    code = getattr(exc, "error_code", None)
    message = without_database_text(getattr(exc, "message", None) or str(exc))
    if code and code != "INTERNAL_ERROR" and not message.startswith(code):
        return f"{code}: {message}"
    return message
