"""A batch of metric points is stored with two statements on PostgreSQL, not through the ORM.

MLflow 3.17's SQL store makes one ORM object per point, flushes them through SQLAlchemy's unit of
work, then reads the run's latest value of each key (locking those rows), compares in Python and
updates the newer ones one statement at a time. Measured in-process with a CPU-time profiler on
the server's own app (bench/, 100 points of 10 keys per ``log_batch``): that was two thirds of the
server's CPU per request, the most of any part, and it caps how many points 8 trainers can log.

On PostgreSQL the same outcome takes two statements:

* the points: one ``INSERT ... SELECT FROM unnest(arrays)``, each column's values in one array,
  so the statement's text is the same for every batch. When a point was stored before (same key,
  timestamp, step and value: a retried request), the insert fails and MLflow's own code stores
  the batch instead, skipping what is there as it always has;
* the latest values, the same way: one ``INSERT ... ON CONFLICT (key, run_uuid) DO UPDATE ...
  WHERE`` the new point is newer by (step, timestamp, value), MLflow's own order. PostgreSQL
  locks each ``latest_metrics`` row it updates until the commit, as MLflow's ``SELECT ... FOR
  UPDATE`` did, and the keys go in sorted order, as MLflow sorts them, so two batches never wait
  on each other in a cycle.

Validation, the run lookup and the "run is active" check are MLflow's own calls, in the same
order. Other databases go to MLflow's code unchanged.

A ``log_batch`` of metrics only (no params, tags or model ids: what trainers send) is validated by
MLflow's batch checks once and stored in one session. MLflow's own ``log_batch`` opens a session
to read the run and check it is active, then, inside it, the metric writer opens a second one
(a second pooled connection) to read and check it again and validates every point a second time.
"""

from __future__ import annotations

import contextvars
import functools
from typing import NamedTuple

from mlstack.patches.self_check import Patch

# The columns this writes, per table; the check compares them with MLflow's models, so a schema
# that gained or lost a column stops the server instead of being written half.
METRIC_COLUMNS = {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}
METRIC_PK = ("key", "timestamp", "step", "run_uuid", "value", "is_nan")
LATEST_PK = ("key", "run_uuid")

# Set while a metrics-only log_batch stores points its batch checks already validated.
_batch_validated = contextvars.ContextVar("mlstack_metric_batch_validated", default=False)


def install_metric_upsert() -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    real = SqlAlchemyStore._log_metrics_once
    if getattr(real, "_upserts", False):
        return

    def _log_metrics_once(self, run_id, metrics):
        from mlflow.store.db.db_types import POSTGRES

        if self.db_type != POSTGRES:
            return real(self, run_id, metrics)
        return _upsert_metrics(self, run_id, metrics, mlflow_path=real)

    _log_metrics_once._upserts = True
    _log_metrics_once.mlflows = real  # what tests compare ours with
    SqlAlchemyStore._log_metrics_once = _log_metrics_once

    real_log_batch = SqlAlchemyStore.log_batch

    def log_batch(self, run_id, metrics, params, tags):
        from mlflow.store.db.db_types import POSTGRES

        if self.db_type != POSTGRES or params or tags or any(m.model_id is not None for m in metrics):
            return real_log_batch(self, run_id, metrics, params, tags)
        return _log_metrics_batch(self, run_id, metrics)

    log_batch._upserts = True
    SqlAlchemyStore.log_batch = log_batch


def _log_metrics_batch(store, run_id: str, metrics) -> None:
    """MLflow's log_batch for a batch of metrics only: its checks in its order, then the metric
    writer's one session (the run, "active", the two statements), errors wrapped as MLflow does."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
    from mlflow.store.tracking import sqlalchemy_store as sa_store

    sa_store._validate_run_id(run_id)
    metrics, _, _ = sa_store._validate_batch_log_data(metrics, [], [])
    sa_store._validate_batch_log_limits(metrics, [], [])
    validated = _batch_validated.set(True)
    try:
        store._log_metrics(run_id, metrics)
    except MlflowException:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow's log_batch reports any other failure this way
        raise MlflowException(exc, INTERNAL_ERROR) from exc
    finally:
        _batch_validated.reset(validated)


def _upsert_metrics(store, run_id: str, metrics, mlflow_path) -> None:
    from mlflow.store.tracking import sqlalchemy_store as sa_store
    from sqlalchemy.exc import IntegrityError

    points = _Points()
    seen = set()
    single = len(metrics) == 1
    validated = _batch_validated.get()
    for idx, metric in enumerate(metrics):
        if not validated:  # MLflow's checks and messages, looked up where the store finds them
            sa_store._validate_metric(metric.key, metric.value, metric.timestamp, metric.step,
                                      path="" if single else f"metrics[{idx}]")
        if metric in seen:
            continue
        seen.add(metric)
        is_nan, value = store.sanitize_metric_value(metric.value)
        points.add(key=metric.key, value=value, timestamp=metric.timestamp, step=metric.step, is_nan=is_nan)
    with store.ManagedSessionMaker(read_only=False) as session:
        run = store._get_run(run_uuid=run_id, session=session)
        store._check_run_is_active(run)
        if not points:
            return
        statements = _statements()
        try:
            session.execute(statements.insert_points, points.parameters(run_id))
        except IntegrityError:
            # A point stored before (a retried request): MLflow's own path finds which ones and
            # stores the rest. Rare, so the common batch pays for no conflict check per row
            # (ON CONFLICT DO NOTHING doubled PostgreSQL's CPU per batch, bench/).
            session.rollback()
            stored_before = True
        else:
            stored_before = False
            session.execute(statements.upsert_latest, points.newest_per_key().parameters(run_id))
            session.commit()
    if stored_before:
        mlflow_path(store, run_id, metrics)


# A point's columns, sent as one array each; run_uuid is the batch's one value.
POINT_COLUMNS = ("key", "value", "timestamp", "step", "is_nan")


def _array_parameter(column: str) -> str:
    return f"{column}_array"


class _Points:
    """A batch's points as one list per column: each statement sends them as arrays, so its text
    is the same for every batch (SQLAlchemy compiles it once; a multi-row VALUES was compiled per
    batch, a third of the writer's CPU) and PostgreSQL parses a short statement."""

    def __init__(self):
        self.columns: dict[str, list] = {column: [] for column in POINT_COLUMNS}

    def __len__(self) -> int:
        return len(self.columns["key"])

    def add(self, **point) -> None:
        for column, values in self.columns.items():
            values.append(point[column])

    def point(self, i: int) -> dict:
        return {column: values[i] for column, values in self.columns.items()}

    def parameters(self, run_id: str) -> dict:
        return {"run_uuid": run_id, **{_array_parameter(c): values for c, values in self.columns.items()}}

    def newest_per_key(self) -> "_Points":
        """Per key, the newest point of the batch in MLflow's order (step, timestamp, value), keys
        sorted as MLflow sorts them, so two batches lock the same rows in the same order."""
        c = self.columns
        newest: dict[str, int] = {}
        for i, key in enumerate(c["key"]):
            best = newest.get(key)
            if best is None or (c["step"][i], c["timestamp"][i], c["value"][i]) > (
                    c["step"][best], c["timestamp"][best], c["value"][best]):
                newest[key] = i
        out = _Points()
        for key in sorted(newest):
            out.add(**self.point(newest[key]))
        return out


class _Statements(NamedTuple):
    insert_points: object
    upsert_latest: object


@functools.cache
def _statements() -> _Statements:
    """The two statements, written once per process from MLflow's table definitions (names and
    column types). The upsert replaces a key's latest value only with a newer one by MLflow's
    order, (step, timestamp, value)."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from sqlalchemy import text
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    quote = dialect.identifier_preparer.quote
    latest = SqlLatestMetric.__table__
    order = ("step", "timestamp", "value")
    upsert = (
        f"{_insert_from_arrays(latest, dialect)} "
        f"ON CONFLICT ({', '.join(quote(c) for c in LATEST_PK)}) DO UPDATE SET "
        + ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in ("value", "timestamp", "step", "is_nan"))
        + " WHERE (" + ", ".join(f"excluded.{quote(c)}" for c in order) + ") > ("
        + ", ".join(f"{quote(latest.name)}.{quote(c)}" for c in order) + ")"
    )
    return _Statements(text(_insert_from_arrays(SqlMetric.__table__, dialect)), text(upsert))


def _insert_from_arrays(table, dialect) -> str:
    """``INSERT INTO table (columns) SELECT ... FROM unnest(arrays) ORDER BY position``: one row per
    array position, in the arrays' order (the upsert's lock order)."""
    from sqlalchemy import String

    def sql_type(column) -> str:
        # Strings without their length: a cast to VARCHAR(250) would cut a longer key silently,
        # where storing it in the column is refused.
        return "VARCHAR" if isinstance(column.type, String) else column.type.compile(dialect=dialect)

    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(c) for c in POINT_COLUMNS)
    arrays = ", ".join(f"CAST(:{_array_parameter(c)} AS {sql_type(table.c[c])}[])" for c in POINT_COLUMNS)
    return (f"INSERT INTO {quote(table.name)} ({columns}, run_uuid) "
            f"SELECT {columns}, CAST(:run_uuid AS {sql_type(table.c.run_uuid)}) "
            f"FROM unnest({arrays}) WITH ORDINALITY AS point({columns}, position) ORDER BY position")


def check_metric_upsert(app) -> str | None:
    """The store's metric writer is ours, and MLflow's tables still have the columns and keys the
    two statements name."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if not getattr(SqlAlchemyStore._log_metrics_once, "_upserts", False):
        return "SqlAlchemyStore._log_metrics_once is not the upserting writer"
    if not getattr(SqlAlchemyStore.log_batch, "_upserts", False):
        return "SqlAlchemyStore.log_batch is not the one-session metric batch"
    from mlflow.store.tracking import sqlalchemy_store as sa_store

    for name in ("_validate_run_id", "_validate_batch_log_data", "_validate_batch_log_limits", "_validate_metric"):
        if not callable(getattr(sa_store, name, None)):
            return f"mlflow.store.tracking.sqlalchemy_store has no {name}, which the metric writer calls"
    for model, pk in ((SqlMetric, METRIC_PK), (SqlLatestMetric, LATEST_PK)):
        table = model.__table__
        if set(table.c.keys()) != METRIC_COLUMNS:
            return f"MLflow's table {table.name} has columns {sorted(table.c.keys())}, not {sorted(METRIC_COLUMNS)}"
        if set(table.primary_key.columns.keys()) != set(pk):
            return f"MLflow's table {table.name} has the key {sorted(table.primary_key.columns.keys())}, not {sorted(pk)}"
    for name in ("sanitize_metric_value", "_get_run", "_check_run_is_active", "_log_metrics"):
        if not hasattr(SqlAlchemyStore, name):
            return f"SqlAlchemyStore has no {name}, which the metric writer calls"
    return None


PATCH = Patch(
    name="metric_upsert",
    without_it="every metric point is an ORM object and every batch reads, locks and updates the run's "
               "latest values one statement at a time (two thirds of the server's CPU per log_batch)",
    install=install_metric_upsert,
    check=check_metric_upsert,
)
