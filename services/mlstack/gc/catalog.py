"""The tracking database as gc sees it: the rows the plan judges by, and MLflow's hard deletes.

Rows are read with plain queries (one pass per table, however many runs); rows are removed with
MLflow's own ``_hard_delete_*`` methods, the ones ``mlflow gc`` uses, so the cascade over metrics,
params, tags and the rest stays MLflow's business.
"""

from __future__ import annotations

from sqlalchemy import text

from mlstack import settings as s
from mlstack.gc import trainer_contract as tc
from mlstack.gc.records import Catalog, ExperimentRecord, ModelRecord, ModelVersionRecord, RunRecord

DELETED_VERSION_STAGE = "Deleted_Internal"  # MLflow's mark for a deleted model version


class TrackingDatabase:
    def __init__(self, store):
        self.store = store

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TrackingDatabase:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        # The store checks that the schema is this MLflow's (refusing an unmigrated database).
        return cls(SqlAlchemyStore(s.backend_store_uri(env), "mlflow-artifacts:/"))

    def _rows(self, sql: str, **params):
        with self.store.engine.connect() as conn:
            return conn.execute(text(sql), params).all()

    def read(self) -> Catalog:
        cat = Catalog()
        for r in self._rows("SELECT experiment_id, artifact_location, lifecycle_stage, last_update_time "
                            "FROM experiments"):
            cat.experiments[str(r[0])] = ExperimentRecord(str(r[0]), r[1] or "", r[2], r[3])
        for r in self._rows("SELECT r.run_uuid, r.experiment_id, r.artifact_uri, r.lifecycle_stage, r.status, "
                            "r.deleted_time, t.value FROM runs r LEFT JOIN tags t "
                            "ON t.run_uuid = r.run_uuid AND t.key = :lease", lease=tc.LEASE_TAG):
            cat.runs[r[0]] = RunRecord(r[0], str(r[1]), r[2] or "", r[3], r[4], r[5], r[6])
        for r in self._rows("SELECT model_id, experiment_id, artifact_location, lifecycle_stage, "
                            "last_updated_timestamp_ms, source_run_id FROM logged_models"):
            cat.models[r[0]] = ModelRecord(r[0], str(r[1]), r[2], r[3], r[4], r[5])
        for r in self._rows("SELECT name, version, source, storage_location FROM model_versions "
                            "WHERE current_stage IS NULL OR current_stage != :gone", gone=DELETED_VERSION_STAGE):
            cat.versions.append(ModelVersionRecord(r[0], r[1], r[2], r[3]))
        return cat

    def still_deleted(self, kind: str, ident: str) -> bool:
        """Re-read right before removal: a run, model or experiment restored since the plan stays."""
        table, column = {"run": ("runs", "run_uuid"), "logged_model": ("logged_models", "model_id"),
                         "experiment": ("experiments", "experiment_id")}[kind]
        value = int(ident) if kind == "experiment" else ident
        rows = self._rows(f"SELECT lifecycle_stage FROM {table} WHERE {column} = :id", id=value)
        return bool(rows) and rows[0][0] == "deleted"

    def lease_tag(self, run_id: str) -> str | None:
        rows = self._rows("SELECT value FROM tags WHERE run_uuid = :id AND key = :lease", id=run_id, lease=tc.LEASE_TAG)
        return rows[0][0] if rows else None

    def hard_delete(self, kind: str, ident: str) -> None:
        {"run": self.store._hard_delete_run, "logged_model": self.store._hard_delete_logged_model,
         "experiment": self.store._hard_delete_experiment}[kind](ident)
