"""A batch of metric points is stored with one statement on PostgreSQL, not through the ORM.

MLflow 3.17's SQL store makes one ORM object per point, flushes them through SQLAlchemy's unit of
work, then reads the run's latest value of each key (locking those rows), compares in Python and
updates the newer ones one statement at a time. Measured in-process with a CPU-time profiler on
the server's own app (bench/, 100 points of 10 keys per ``log_batch``): that was two thirds of the
server's CPU per request, the most of any part, and it caps how many points 8 trainers can log.

On PostgreSQL the same outcome takes one statement, three parts of one ``WITH``:

* the run: its lifecycle stage, read as MLflow's ``_get_run`` reads it (no lock). Unless it is
  active, the transaction is rolled back, so nothing is written, and MLflow's own code runs
  instead, which raises its own error; a missing run fails the points' foreign key first, to the
  same end. (With the run loaded through the ORM and two statements, each its own round trip,
  the writer took 3.40 ms of CPU per batch of 100 points; in one statement, 2.43 ms: bench/README.md.)
* the points: one ``INSERT ... SELECT FROM unnest(arrays)``, each column's values in one array,
  so the statement's text is the same for every batch. When a point was stored before (same key,
  timestamp, step and value: a retried request), the insert fails and MLflow's own code stores
  the batch instead, skipping what is there as it always has;
* the latest values, the same way: one ``INSERT ... ON CONFLICT (key, run_uuid) DO UPDATE ...
  WHERE`` the new point is newer by (step, timestamp, value), MLflow's own order. PostgreSQL
  locks each ``latest_metrics`` row it updates until the commit, as MLflow's ``SELECT ... FOR
  UPDATE`` did, and the keys go in sorted order, as MLflow sorts them, so two batches never wait
  on each other in a cycle.

Points are validated by MLflow's own checks, in MLflow's order. Other databases, and stores that scope
queries to a workspace (they override ``_get_query``, which this statement does not go through),
go to MLflow's code unchanged.

A ``log_batch`` of metrics only (no params, tags or model ids: what trainers send) is validated by
MLflow's batch checks once and stored in one session. MLflow's own ``log_batch`` opens a session
to read the run and check it is active, then, inside it, the metric writer opens a second one
(a second pooled connection) to read and check it again and validates every point a second time.
Here the statement above reads and checks it once.
"""

from __future__ import annotations

import contextvars
import functools

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
        if not _writes_here(self):
            return real(self, run_id, metrics)
        return _upsert_metrics(self, run_id, metrics, mlflow_path=real)

    _log_metrics_once._upserts = True
    _log_metrics_once.mlflows = real  # what tests compare ours with
    SqlAlchemyStore._log_metrics_once = _log_metrics_once

    real_log_batch = SqlAlchemyStore.log_batch

    def log_batch(self, run_id, metrics, params, tags):
        if not _writes_here(self) or params or tags or any(m.model_id is not None for m in metrics):
            return real_log_batch(self, run_id, metrics, params, tags)
        return _log_metrics_batch(self, run_id, metrics)

    log_batch._upserts = True
    SqlAlchemyStore.log_batch = log_batch


def _writes_here(store) -> bool:
    """PostgreSQL, and a store whose queries are not scoped (see the module's docstring)."""
    from mlflow.store.db.db_types import POSTGRES
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return store.db_type == POSTGRES and type(store)._get_query is SqlAlchemyStore._get_query


def _log_metrics_batch(store, run_id: str, metrics) -> None:
    """MLflow's log_batch for a batch of metrics only: its checks in its order, then the metric
    writer's one statement, errors wrapped as MLflow does."""
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
    from mlflow.entities import LifecycleStage
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
    parameters = {"run_uuid": run_id, **points.arrays(POINTS), **points.newest_per_key().arrays(LATEST)}
    with store.ManagedSessionMaker(read_only=False) as session:
        try:
            stage = session.execute(_batch_statement(), parameters).scalar()
        except IntegrityError:
            # A point stored before (a retried request): MLflow's own path finds which ones and
            # stores the rest. Rare, so the common batch pays for no conflict check per row
            # (ON CONFLICT DO NOTHING doubled PostgreSQL's CPU per batch, bench/). Also a missing
            # run, whose points fail their foreign key: MLflow's path raises its error.
            session.rollback()
            stored = False
        else:
            stored = stage == LifecycleStage.ACTIVE  # MLflow's _check_run_is_active
            if stored:
                session.commit()
            else:
                session.rollback()
    if not stored:
        # Also a run that is not active (nothing was written): MLflow's path raises its error.
        mlflow_path(store, run_id, metrics)


# A point's columns, sent as one array each; run_uuid is the batch's one value.
POINT_COLUMNS = ("key", "value", "timestamp", "step", "is_nan")
# The prefixes of the two sets of arrays: the batch's points, and each key's newest point.
POINTS, LATEST = "point", "latest"


def _array_parameter(prefix: str, column: str) -> str:
    return f"{prefix}_{column}_array"


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

    def arrays(self, prefix: str) -> dict:
        return {_array_parameter(prefix, c): values for c, values in self.columns.items()}

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


@functools.cache
def _batch_statement():
    """The one statement, written once per process from MLflow's table definitions (names and
    column types). Its result is the run's lifecycle stage, no row when there is no such run.
    The upsert replaces a key's latest value only with a newer one by MLflow's order, (step,
    timestamp, value)."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
    from sqlalchemy import text
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    quote = dialect.identifier_preparer.quote
    runs, latest = SqlRun.__table__, SqlLatestMetric.__table__
    # PostgreSQL runs every data-modifying part of a WITH to completion, read or not.
    order = ("step", "timestamp", "value")
    upsert = (
        f"{_insert_from_arrays(latest, dialect, LATEST)} "
        f"ON CONFLICT ({', '.join(quote(c) for c in LATEST_PK)}) DO UPDATE SET "
        + ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in ("value", "timestamp", "step", "is_nan"))
        + " WHERE (" + ", ".join(f"excluded.{quote(c)}" for c in order) + ") > ("
        + ", ".join(f"{quote(latest.name)}.{quote(c)}" for c in order) + ")"
    )
    return text(
        f"WITH run AS (SELECT {quote('lifecycle_stage')} FROM {quote(runs.name)} "
        f"WHERE {quote('run_uuid')} = CAST(:run_uuid AS {_sql_type(runs.c.run_uuid, dialect)})), "
        f"points AS ({_insert_from_arrays(SqlMetric.__table__, dialect, POINTS)}), "
        f"latest AS ({upsert}) "
        "SELECT lifecycle_stage FROM run"
    )


def _sql_type(column, dialect) -> str:
    from sqlalchemy import String

    # Strings without their length: a cast to VARCHAR(250) would cut a longer key silently,
    # where storing it in the column is refused.
    return "VARCHAR" if isinstance(column.type, String) else column.type.compile(dialect=dialect)


def _insert_from_arrays(table, dialect, prefix: str) -> str:
    """``INSERT INTO table (columns) SELECT ... FROM unnest(arrays) ORDER BY position``: one row per
    array position, in the arrays' order (the upsert's lock order)."""
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(c) for c in POINT_COLUMNS)
    arrays = ", ".join(f"CAST(:{_array_parameter(prefix, c)} AS {_sql_type(table.c[c], dialect)}[])"
                       for c in POINT_COLUMNS)
    return (f"INSERT INTO {quote(table.name)} ({columns}, run_uuid) "
            f"SELECT {columns}, CAST(:run_uuid AS {_sql_type(table.c.run_uuid, dialect)}) "
            f"FROM unnest({arrays}) WITH ORDINALITY AS point({columns}, position) ORDER BY position")


def check_metric_upsert(app) -> str | None:
    """The store's metric writer is ours, and MLflow's tables still have the columns and keys its
    statement names."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
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
    if missing := {"run_uuid", "lifecycle_stage"} - set(SqlRun.__table__.c.keys()):
        return f"MLflow's table {SqlRun.__table__.name} has no column {', '.join(sorted(missing))}"
    for name in ("sanitize_metric_value", "_get_query", "_log_metrics"):
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
