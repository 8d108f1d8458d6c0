"""What gc reads: the bucket's objects and pending uploads, and the database's rows it judges by."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    etag: str
    modified: float  # unix seconds


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted: its parts take space."""

    key: str
    upload_id: str
    initiated: float  # unix seconds
    size: int  # bytes of the parts uploaded so far


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment_id: str
    artifact_uri: str
    lifecycle_stage: str  # active | deleted
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    deleted_time_ms: int | None
    lease_tag: str | None


@dataclass(frozen=True)
class ExperimentRecord:
    experiment_id: str
    artifact_location: str
    lifecycle_stage: str
    last_update_time_ms: int | None


@dataclass(frozen=True)
class ModelRecord:
    """An MLflow 3 logged model (its artifacts under ``<experiment>/models/<model_id>/``)."""

    model_id: str
    experiment_id: str
    artifact_location: str
    lifecycle_stage: str
    last_updated_ms: int | None
    source_run_id: str | None


@dataclass(frozen=True)
class ModelVersionRecord:
    """A registered model version: its files must outlive whatever run or model logged them."""

    name: str
    version: int
    source: str | None
    storage_location: str | None


@dataclass
class Catalog:
    experiments: dict[str, ExperimentRecord] = field(default_factory=dict)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)
    versions: list[ModelVersionRecord] = field(default_factory=list)
