"""The metric writer (mlstack.patches.metric_upsert) stores what MLflow's own code stores.

Both write random batches into runs of the session's PostgreSQL, in this process: MLflow's
``_log_metrics_once`` into one run, ours (through ``log_batch``, the server's path, and through
``_log_metrics``, the one-point path) into another; each run's points and latest values must be
the same. The batches hold what trainers send and what they should not: NaN and infinities,
duplicate points, points older than the stored latest value, a batch sent again.
"""

from __future__ import annotations

import math
import random

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from mlstack import settings as s
from mlstack.patches import metric_upsert

KEYS = [f"loss/{i}" for i in range(7)]


@pytest.fixture(scope="module")
def store(native_stack):
    with pytest.MonkeyPatch.context() as patch:
        # Installed for this module only: the patch replaces the class's methods.
        for name in ("_log_metrics_once", "log_batch"):
            patch.setattr(SqlAlchemyStore, name, getattr(SqlAlchemyStore, name))
        metric_upsert.install_metric_upsert()
        assert metric_upsert.check_metric_upsert(None) is None
        yield SqlAlchemyStore(s.backend_store_uri(native_stack.env), "mlflow-artifacts:/")


@pytest.fixture(scope="module")
def experiment_id(store):
    return store.create_experiment("metric-writer")


def random_batches(seed: int) -> list[list[Metric]]:
    rng = random.Random(seed)
    values = [1.0, 2.0, -0.5, 0.0, math.nan, math.inf, -math.inf]
    batches = []
    for _ in range(12):
        batch = [Metric(rng.choice(KEYS), rng.choice(values + [rng.random()]), rng.randint(0, 5), rng.randint(0, 20))
                 for _ in range(rng.randint(1, 60))]
        batch += rng.sample(batch, min(5, len(batch)))  # points twice in one batch
        batches.append(batch)
    batches.append(batches[3])  # a batch sent again (a retried request)
    return batches


def stored(store, run_id: str) -> tuple[list, dict]:
    latest = sorted((m.key, m.step, m.timestamp, repr(m.value)) for m in store.get_run(run_id).data._metric_objs)
    history = {key: sorted((m.step, m.timestamp, repr(m.value)) for m in store.get_metric_history(run_id, key))
               for key in KEYS}
    return latest, history


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_are_stored_as_mlflow_stores_them(store, experiment_id, seed):
    mlflows = SqlAlchemyStore._log_metrics_once.mlflows
    theirs = store.create_run(experiment_id, "u", 0, [], f"mlflow-{seed}").info.run_id
    ours = store.create_run(experiment_id, "u", 0, [], f"ours-{seed}").info.run_id
    for batch in random_batches(seed):
        mlflows(store, theirs, batch)
        store.log_batch(ours, batch, [], [])
    latest, history = stored(store, ours)
    assert (latest, history) == stored(store, theirs)
    assert sum(len(points) for points in history.values()) > 100  # the batches were stored at all
    assert any(value == "nan" for *_, value in latest + [p for ps in history.values() for p in ps])


def test_one_point_at_a_time_is_stored_as_mlflow_stores_it(store, experiment_id):
    mlflows = SqlAlchemyStore._log_metrics_once.mlflows
    theirs = store.create_run(experiment_id, "u", 0, [], "mlflow-single").info.run_id
    ours = store.create_run(experiment_id, "u", 0, [], "ours-single").info.run_id
    for point in random_batches(4)[0] * 2:
        mlflows(store, theirs, [point])
        store._log_metrics(ours, [point])
    assert stored(store, ours) == stored(store, theirs)


def test_a_key_longer_than_the_column_is_refused_by_the_database_not_cut(store, experiment_id):
    """MLflow's checks refuse such a key first; past them (as for a batch they already checked),
    the database refuses it too: the arrays' casts do not cut strings to the column's length."""
    import contextvars

    run_id = store.create_run(experiment_id, "u", 0, [], "long-key").info.run_id
    with pytest.raises(MlflowException, match="250"):
        store.log_batch(run_id, [Metric("k" * 251, 1.0, 1, 1)], [], [])

    def past_mlflows_checks():
        metric_upsert._batch_validated.set(True)
        store._log_metrics(run_id, [Metric("k" * 251, 1.0, 1, 1)])

    with pytest.raises(MlflowException, match="value too long"):
        contextvars.copy_context().run(past_mlflows_checks)
    assert store.get_run(run_id).data.metrics == {}


def test_a_missing_or_deleted_run_gets_mlflows_error_and_nothing_is_stored(store, experiment_id):
    """The writer's one statement reads the run's stage with the writes: a run that is not active
    rolls them back and MLflow's own path raises, as MLflow's writer would."""
    mlflows = SqlAlchemyStore._log_metrics_once.mlflows
    missing = "f" * 32
    for write in (lambda run_id, batch: store.log_batch(run_id, batch, [], []), store._log_metrics,
                  lambda run_id, batch: mlflows(store, run_id, batch)):
        with pytest.raises(MlflowException, match=f"Run with id={missing} not found"):
            write(missing, [Metric("loss", 1.0, 1, 1)])
    deleted = store.create_run(experiment_id, "u", 0, [], "deleted").info.run_id
    store._log_metrics(deleted, [Metric("loss", 1.0, 1, 1)])
    store.delete_run(deleted)
    for batch in ([Metric("loss", 2.0, 2, 2)], [Metric("loss", 1.0, 1, 1)]):  # new; stored before
        with pytest.raises(MlflowException, match="must be in the 'active' state"):
            store.log_batch(deleted, batch, [], [])
    store.restore_run(deleted)
    assert [(m.step, m.value) for m in store.get_metric_history(deleted, "loss")] == [(1, 1.0)]
    assert store.get_run(deleted).data.metrics == {"loss": 1.0}
