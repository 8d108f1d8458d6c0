"""Where each stack database's schema stands against the installed MLflow, and what that allows.

The stack has two databases with alembic migrations of their own: the tracking store (runs,
metrics, models; ``mlflow db upgrade``) and the auth store (users, permissions; MLflow migrates
it by itself whenever its auth app opens it). MLflow's docs say migrations are not transactional
and to back up first, so the server must never migrate either one as a side effect of starting:
a database behind the installed MLflow is migrated only by the upgrade procedure
(``mlstack.upgrade``), which takes a backup first. One written by a newer MLflow cannot be served
at all. Both rules read :func:`inspect` and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

# The table alembic keeps each database's revision in (MLflow's names).
TRACKING_VERSION_TABLE = "alembic_version"
AUTH_VERSION_TABLE = "alembic_version_auth"


class Standing(enum.Enum):
    FRESH = "fresh"        # no MLflow tables yet: the server creates the schema
    CURRENT = "current"    # at the installed MLflow's head
    BEHIND = "behind"      # an older MLflow's schema: migrate (after a backup) before serving
    UNKNOWN = "unknown"    # a revision the installed MLflow does not know: a newer MLflow wrote it


@dataclass(frozen=True)
class SchemaState:
    database: str           # "tracking" or "auth", for messages
    standing: Standing
    revision: str | None    # what the database says (None: fresh, or auth tables from before MLflow 3.6)
    head: str               # what the installed MLflow migrates to
    pending: int = 0        # migrations between revision and head, when BEHIND

    def describe(self) -> str:
        if self.standing is Standing.FRESH:
            return f"{self.database} database: empty (the server creates the schema at {self.head})"
        if self.standing is Standing.CURRENT:
            return f"{self.database} database: at {self.head}, the installed MLflow's schema"
        if self.standing is Standing.BEHIND:
            return (f"{self.database} database: at {self.revision or 'an unversioned pre-3.6 schema'}, "
                    f"{self.pending} migration(s) behind the installed MLflow's {self.head}")
        return (f"{self.database} database: at revision {self.revision}, which the installed MLflow "
                f"does not know (its head is {self.head}): a newer MLflow wrote it")


def _tracking_migrations() -> Path:
    import mlflow.store

    return Path(mlflow.store.__file__).parent / "db_migrations"


def _auth_migrations() -> Path:
    from mlflow.server.auth.db import utils

    return Path(utils.__file__).parent / "migrations"


def _script(migrations: Path):
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(migrations))
    return ScriptDirectory.from_config(config)


def heads() -> dict[str, str]:
    """The schema revision the installed MLflow migrates each database to (no database needed)."""
    return {"tracking": _script(_tracking_migrations()).get_current_head(),
            "auth": _script(_auth_migrations()).get_current_head()}


def _standing(database: str, engine, migrations: Path, version_table: str, marker_table: str) -> SchemaState:
    """``marker_table`` is one table the schema always has: present without a version table means
    an unversioned schema (the auth store before MLflow 3.6), which MLflow stamps and migrates."""
    from alembic.migration import MigrationContext
    from alembic.script.revision import RevisionError
    from sqlalchemy import inspect as sa_inspect

    script = _script(migrations)
    head = script.get_current_head()
    tables = set(sa_inspect(engine).get_table_names())
    if version_table not in tables:
        if marker_table in tables:
            return SchemaState(database, Standing.BEHIND, None, head, len(list(script.walk_revisions())))
        return SchemaState(database, Standing.FRESH, None, head)
    with engine.connect() as conn:
        revision = MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()
    if revision is None:
        return SchemaState(database, Standing.FRESH, None, head)
    if revision == head:
        return SchemaState(database, Standing.CURRENT, revision, head)
    try:
        # From head down to the database's revision, that one excluded: the migrations to run.
        pending = len(list(script.iterate_revisions(head, revision)))
    except RevisionError:
        return SchemaState(database, Standing.UNKNOWN, revision, head)
    return SchemaState(database, Standing.BEHIND, revision, head, pending)


def inspect(tracking_uri: str, auth_uri: str) -> tuple[SchemaState, SchemaState]:
    """The tracking and the auth database's standing against the installed MLflow (reads only)."""
    from sqlalchemy import create_engine

    states = []
    for database, uri, migrations, version_table, marker in (
        ("tracking", tracking_uri, _tracking_migrations(), TRACKING_VERSION_TABLE, "experiments"),
        ("auth", auth_uri, _auth_migrations(), AUTH_VERSION_TABLE, "users"),
    ):
        engine = create_engine(uri)
        try:
            states.append(_standing(database, engine, migrations, version_table, marker))
        finally:
            engine.dispose()
    return states[0], states[1]
