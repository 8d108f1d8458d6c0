"""Dump and restore one PostgreSQL database, and the few queries a backup asks, through the
target's own client tools (``Target.pg``).

A dump is ``pg_dump``'s custom format: one consistent snapshot of one database (pg_dump reads
inside a single repeatable-read transaction, so rows written while it runs are either all in or
all out). It is taken without owners and privileges, so it restores into a stack whose database
account has another name.
"""

from __future__ import annotations

from pathlib import Path

from mlstack.backup.targets import Target

# Where MLflow's migrations record the schema revision of each database.
VERSION_TABLES = {"tracking": "alembic_version", "auth": "alembic_version_auth"}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def dump(target: Target, database: str, path: Path) -> None:
    with open(path, "wb") as out:
        target.pg("pg_dump", "--format=custom", "--no-owner", "--no-acl", "--dbname", database, stdout=out)


def query(target: Target, database: str, sql: str) -> list[list[str]]:
    """Rows of ``sql`` as lists of text fields (fed on stdin: nothing of it shows in a process list)."""
    out = target.pg("psql", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "--tuples-only", "--no-align",
                    "--field-separator=\t", "--dbname", database, input_text=sql)
    return [line.split("\t") for line in out.splitlines() if line]


def execute(target: Target, database: str, sql: str) -> None:
    query(target, database, sql)


def schema_revision(target: Target, database: str, role: str) -> str | None:
    table = VERSION_TABLES[role]
    rows = query(target, database, f"SELECT to_regclass('{table}') IS NOT NULL;")
    if rows != [["t"]]:
        return None
    found = query(target, database, f"SELECT version_num FROM {table};")
    return found[0][0] if found else None


def replace(target: Target, database: str, path: Path) -> None:
    """Drop ``database``, create it empty and load the dump at ``path`` into it, all or nothing.

    The MLflow server must be stopped (it holds connections); FORCE ends any connection left.
    """
    execute(target, "postgres", f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE);")
    execute(target, "postgres", f"CREATE DATABASE {quote_ident(database)};")
    with open(path, "rb") as dump_file:
        # --single-transaction: a dump that fails half-way leaves an empty database, not half of one.
        target.pg("pg_restore", "--no-owner", "--no-acl", "--exit-on-error", "--single-transaction",
                  "--dbname", database, stdin=dump_file)
