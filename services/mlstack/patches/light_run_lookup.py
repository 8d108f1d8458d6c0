"""The auth checks look a run's experiment up with one narrow query, not a whole-run load.

To authorize a write to a run (log_batch, set_tag...), MLflow's auth app loads the whole run
(every param, tag and latest metric) only to read its experiment id. A training run logs a
few hundred params, and that load was 65% of the server's CPU per log_batch (py-spy, bench/):
35 ms of CPU per metrics request. The answer is remembered per worker (a run never changes
experiment): with it, the auth check of a metrics request touches the tracking database not at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from types import SimpleNamespace

from mlstack.patches.self_check import Patch


def install_light_run_lookup() -> None:
    """Let the auth checks look up a run's experiment with one narrow query.

    The view below answers ``get_run`` for the auth module only, with the store's own run query
    (workspaces and "not found" errors included) and no eager loading; every other call goes to
    the real store, and the handlers are untouched.
    """
    from mlflow.server import auth
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    real = auth._get_tracking_store
    if getattr(real, "_light_run_lookup", False):
        return

    def tracking_store():
        store = real()
        return _RunExperimentView(store) if isinstance(store, SqlAlchemyStore) else store

    tracking_store._light_run_lookup = True
    auth._get_tracking_store = tracking_store


def check_light_run_lookup(app) -> str | None:
    """The auth module's store is ours, and the store still has the run query the view calls
    (a changed signature would make every auth check of a run write fail, not just slow down)."""
    import inspect

    from mlflow.server import auth
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if not getattr(getattr(auth, "_get_tracking_store", None), "_light_run_lookup", False):
        return "mlflow.server.auth._get_tracking_store is not the light run lookup"
    wanted = {"session", "run_uuid", "eager"}
    have = set(inspect.signature(SqlAlchemyStore._get_run).parameters) if hasattr(SqlAlchemyStore, "_get_run") else set()
    if missing := wanted - have:
        return f"SqlAlchemyStore._get_run has no parameter {', '.join(sorted(missing))}"
    return None


PATCH = Patch(
    name="light_run_lookup",
    without_it="each auth check of a run write (log_batch, set_tag, ...) loads the whole run, every param, "
               "tag and latest metric, to read its experiment id",
    install=install_light_run_lookup,
    check=check_light_run_lookup,
)


# A run's experiment never changes (MLflow has no call that moves a run) and run ids are never
# reused, so each worker remembers the answer: the auth check of a metrics request then costs no
# database session (each session's checkout pings PostgreSQL first) and no query. A run unknown to
# the database is never remembered: its lookup raises before anything is stored. Bounded, oldest
# dropped first; one entry is ~150 bytes.
RUN_EXPERIMENTS_REMEMBERED = 50_000
_experiment_of_run: OrderedDict[str, str] = OrderedDict()
_remembered_lock = threading.Lock()


class _RunExperimentView:
    def __init__(self, store):
        self._store = store
        # A store that scopes queries to a workspace (a subclass) may answer differently per
        # request: only the plain store's answers are remembered.
        self._remember = type(store) is _plain_store_class()

    def get_run(self, run_id: str):
        experiment_id = _experiment_of_run.get(run_id) if self._remember else None
        if experiment_id is None:
            with self._store.ManagedSessionMaker() as session:
                run = self._store._get_run(run_uuid=run_id, session=session, eager=False)
                experiment_id = str(run.experiment_id)
            if self._remember:
                with _remembered_lock:
                    _experiment_of_run[run_id] = experiment_id
                    while len(_experiment_of_run) > RUN_EXPERIMENTS_REMEMBERED:
                        _experiment_of_run.popitem(last=False)
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id))

    def __getattr__(self, name):
        return getattr(self._store, name)


def _plain_store_class():
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore
