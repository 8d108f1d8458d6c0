"""The auth checks look a run's experiment up with one narrow query, not a whole-run load.

To authorize a write to a run (log_batch, set_tag...), MLflow's auth app loads the whole run
(every param, tag and latest metric) only to read its experiment id. A training run logs a
few hundred params, and that load was 65% of the server's CPU per log_batch (py-spy, bench/):
35 ms of CPU per metrics request.
"""

from __future__ import annotations

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


class _RunExperimentView:
    def __init__(self, store):
        self._store = store

    def get_run(self, run_id: str):
        with self._store.ManagedSessionMaker() as session:
            run = self._store._get_run(run_uuid=run_id, session=session, eager=False)
            return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=str(run.experiment_id)))

    def __getattr__(self, name):
        return getattr(self._store, name)
