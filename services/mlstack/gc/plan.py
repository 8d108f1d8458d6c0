"""What gc removes, and why: the rules, as a pure function of a bucket listing and the database.

Nothing younger than the age (``--older-than``) is ever removed: not a deleted run, model or
experiment deleted more recently, not an object written more recently, not an upload started
more recently. Within that:

1. A deleted run (lifecycle ``deleted``; MLflow's gc rule, judged by its ``deleted_time``): every
   object under its artifact location, its pending uploads, and its rows. Its logged models go
   with it (a deleted run's final model would otherwise go on costing its full size), unless a
   registered model version uses them.
2. A deleted logged model (judged by its last update): its objects and its row.
3. A deleted experiment (judged by its last update), once all its runs and models go too: every
   object under its location (traces included) and its rows.
4. Orphans: objects under ``artifacts/<experiment>/<run id>/`` or ``artifacts/<experiment>/models/
   <model id>/`` whose run or model is not in the database at all, and anything under an
   experiment id the database does not have.
5. Evicted-checkpoint leftovers, the only objects of an existing run that gc touches: in a run the
   trainer created (it has a lease tag) whose lease is free (released or expired), a file under
   ``checkpoints/`` that lies in no folder holding a ``manifest.json`` and that no manifest of the
   run uses (``stored_at``). If any manifest of the run is unreadable, the run is left alone.
   These are re-checked right before deletion (see ``cli``): a run resumed meanwhile is skipped.
6. Pending multipart uploads (never completed, never aborted), unless their run is live.

Never removed: anything a registered model version uses (its source or storage location), any
object of a live run, and any object gc does not recognise the layout of. A run is live when its
lease is held, or when it is RUNNING and has no lease gc can read (not a trainer's run: gc cannot
tell whether its client is alive).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from mlstack.gc import trainer_contract as tc
from mlstack.gc.records import Catalog, ModelRecord, PendingUpload, RunRecord, StoredObject

DELETED = "deleted"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Removal:
    kind: str  # run | logged model | experiment | orphaned objects | checkpoint leftovers | pending uploads
    ident: str
    reason: str
    objects: list[StoredObject] = field(default_factory=list)
    uploads: list[PendingUpload] = field(default_factory=list)
    row: tuple[str, str] | None = None  # (run|logged_model|experiment, id): hard-deleted after its objects
    # (kind, id) that must still be deleted when the removal runs (a restored run keeps its model too)
    requires_deleted: tuple[str, str] | None = None
    recheck_run: str | None = None  # leftovers: deleted only if this run's lease is still free then

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects) + sum(u.size for u in self.uploads)


@dataclass
class Plan:
    removals: list[Removal]
    kept: list[str]  # what looked collectable and was kept, with why
    unrecognised: int  # objects whose layout gc does not know (left alone)
    live_runs: int  # runs whose objects and uploads gc did not look into: they are live


class ArtifactKeys:
    """Artifact URIs as keys of our bucket: ``mlflow-artifacts:/p`` is ``<root>/p``, ``s3://<bucket>/p`` is ``p``."""

    def __init__(self, bucket: str, root: str):
        self.bucket, self.root = bucket, root.strip("/")

    def prefix(self, uri: str | None) -> str | None:
        """The key prefix (ending in ``/``) of everything under ``uri``; ``None`` outside our bucket."""
        if not uri:
            return None
        parsed = urlparse(uri)
        if parsed.scheme == "mlflow-artifacts":
            path = f"{self.root}/{parsed.path.strip('/')}"
        elif parsed.scheme == "s3" and parsed.netloc == self.bucket:
            path = parsed.path.strip("/")
        else:
            return None
        return path.rstrip("/") + "/"


class _Listing:
    """Objects (or uploads) sorted by key, to take everything under a prefix at once."""

    def __init__(self, items, key=lambda item: item.key):
        self.items = sorted(items, key=key)
        self.keys = [key(i) for i in self.items]

    def under(self, prefix: str) -> list:
        start = bisect.bisect_left(self.keys, prefix)
        end = bisect.bisect_left(self.keys, prefix + "\U0010ffff")
        return self.items[start:end]


def ancestors(key: str) -> list[str]:
    """``a/b/c`` -> ``["a/", "a/b/"]``: the folders a key lies in."""
    parts = key.split("/")[:-1]
    return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]


def run_is_live(run: RunRecord, now: float) -> bool:
    state = tc.lease_state(run.lease_tag, now)
    return state == "held" or (state == "unknown" and run.status == "RUNNING")


def make_plan(objects: list[StoredObject], uploads: list[PendingUpload], catalog: Catalog, *,
              now: float, min_age: float, keys: ArtifactKeys,
              read_object: Callable[[str], bytes]) -> Plan:
    """Every removal, in the order they must run (runs and models before their experiments).

    ``objects`` must be listed before ``catalog`` was read: then an object whose owner is missing
    from the catalog really has none (MLflow writes a run's or model's row before its objects).
    """
    cutoff = now - min_age
    old = lambda ms: ms is not None and ms / 1000 <= cutoff  # noqa: E731 - database times are ms
    listing, pending = _Listing(objects), _Listing(uploads)
    removals: list[Removal] = []
    kept: list[str] = []
    claimed: set[str] = set()  # keys and upload ids already in a removal

    protected = _protected_prefixes(catalog, keys)

    def user_of(prefix: str) -> str | None:
        """The registered model version whose files lie in ``prefix`` (or contain it)."""
        for p, who in protected.items():
            if p.startswith(prefix) or prefix.startswith(p):
                return who
        return None

    def take(kind, ident, reason, prefix, row, requires_deleted=None) -> Removal:
        removal = Removal(kind, ident, reason, row=row, requires_deleted=requires_deleted or row,
                          objects=[o for o in listing.under(prefix) if o.key not in claimed],
                          uploads=[u for u in pending.under(prefix) if u.upload_id not in claimed])
        claimed.update(o.key for o in removal.objects)
        claimed.update(u.upload_id for u in removal.uploads)
        removals.append(removal)
        return removal

    # 1. deleted runs, with their logged models
    gone_runs: set[str] = set()
    gone_models: set[str] = set()
    for run in catalog.runs.values():
        if run.lifecycle_stage != DELETED or not old(run.deleted_time_ms):
            continue
        prefix = keys.prefix(run.artifact_uri)
        if prefix is None:
            kept.append(f"run {run.run_id}: its artifacts ({run.artifact_uri}) are outside the bucket; row kept")
            continue
        if (user := user_of(prefix)) is not None:
            kept.append(f"run {run.run_id}: {user} uses its artifacts")
            continue
        for model in _models_of(catalog, run.run_id):
            if model.model_id in gone_models:
                continue
            model_prefix = keys.prefix(model.artifact_location)
            if model_prefix is None or (user := user_of(model_prefix)) is not None:
                kept.append(f"logged model {model.model_id} of deleted run {run.run_id}: "
                            + (f"{user} uses it" if model_prefix else "its artifacts are outside the bucket"))
                continue
            take("logged model", model.model_id, f"logged by deleted run {run.run_id}", model_prefix,
                 row=("logged_model", model.model_id), requires_deleted=("run", run.run_id))
            gone_models.add(model.model_id)
        take("run", run.run_id, "deleted", prefix, row=("run", run.run_id))
        gone_runs.add(run.run_id)

    # 2. deleted logged models
    for model in catalog.models.values():
        if model.model_id in gone_models or model.lifecycle_stage != DELETED or not old(model.last_updated_ms):
            continue
        prefix = keys.prefix(model.artifact_location)
        if prefix is None or (user := user_of(prefix)) is not None:
            kept.append(f"logged model {model.model_id}: "
                        + (f"{user} uses it" if prefix else "its artifacts are outside the bucket"))
            continue
        take("logged model", model.model_id, "deleted", prefix, row=("logged_model", model.model_id))
        gone_models.add(model.model_id)

    # 3. deleted experiments whose runs and models all go
    for exp in catalog.experiments.values():
        if exp.lifecycle_stage != DELETED or not old(exp.last_update_time_ms):
            continue
        staying = [f"run {r.run_id}" for r in catalog.runs.values()
                   if r.experiment_id == exp.experiment_id and r.run_id not in gone_runs]
        staying += [f"logged model {m.model_id}" for m in catalog.models.values()
                    if m.experiment_id == exp.experiment_id and m.model_id not in gone_models]
        prefix = keys.prefix(exp.artifact_location)
        if staying or prefix is None or (user := user_of(prefix)) is not None:
            why = (f"{', '.join(staying[:3])}{' ...' if len(staying) > 3 else ''} stay(s)" if staying
                   else "its artifacts are outside the bucket" if prefix is None else f"{user} uses its artifacts")
            kept.append(f"experiment {exp.experiment_id}: {why}")
            continue
        take("experiment", exp.experiment_id, "deleted", prefix, row=("experiment", exp.experiment_id))

    # 4.-6. what no row owns, leftovers of evicted checkpoints, pending uploads
    owners: dict[str, tuple[str, str]] = {}
    for run in catalog.runs.values():
        if run.run_id not in gone_runs and (p := keys.prefix(run.artifact_uri)):
            owners[p] = ("run", run.run_id)
    for model in catalog.models.values():
        if model.model_id not in gone_models and (p := keys.prefix(model.artifact_location)):
            owners[p] = ("model", model.model_id)

    def owner_of(key: str) -> tuple[str, str] | None:
        return next((owners[a] for a in ancestors(key) if a in owners), None)

    orphans: dict[str, tuple[str, list]] = {}
    unrecognised = 0
    for obj in listing.items:
        if obj.key in claimed or obj.modified > cutoff or user_of(obj.key) is not None:
            continue
        if owner_of(obj.key) is not None:
            continue  # an existing run's or model's; leftovers are judged per run below
        ident, reason = _missing_owner(obj.key, catalog, keys.root)
        if ident is None:
            unrecognised += 1
            continue
        orphans.setdefault(ident, (reason, []))[1].append(obj)
    for ident, (reason, objs) in sorted(orphans.items()):
        removals.append(Removal("orphaned objects", ident, reason, objects=objs))
        claimed.update(o.key for o in objs)

    live_runs = 0
    for run in catalog.runs.values():
        prefix = keys.prefix(run.artifact_uri)
        if run.run_id in gone_runs or prefix is None:
            continue
        if run_is_live(run, now):
            live_runs += 1
            continue
        if tc.lease_state(run.lease_tag, now) != "free":
            continue  # not a trainer's run: its layout is not ours to judge
        leftovers, problem = checkpoint_leftovers(listing.under(prefix + tc.CHECKPOINTS_ROOT + "/"), prefix,
                                                   read_object)
        if problem:
            kept.append(f"run {run.run_id}: checkpoint leftovers not judged, {problem}")
            continue
        leftovers = [o for o in leftovers if o.modified <= cutoff and user_of(o.key) is None]
        if leftovers:
            removals.append(Removal("checkpoint leftovers", run.run_id,
                                    "files of evicted or never-finished checkpoints that no manifest uses; "
                                    "the run's lease is free", objects=leftovers, recheck_run=run.run_id))
            claimed.update(o.key for o in leftovers)

    stale: dict[str, list[PendingUpload]] = {}
    for upload in pending.items:
        if upload.upload_id in claimed or upload.initiated > cutoff:
            continue
        owner = owner_of(upload.key)
        if owner is not None:
            kind, ident = owner
            if kind == "run" and run_is_live(catalog.runs[ident], now):
                continue
            stale.setdefault(f"{kind} {ident}", []).append(upload)
        else:
            ident, _ = _missing_owner(upload.key, catalog, keys.root)
            if ident is not None:
                stale.setdefault(ident, []).append(upload)
    for ident, ups in sorted(stale.items()):
        removals.append(Removal("pending uploads", ident, "multipart uploads never completed", uploads=ups))

    return Plan(removals, kept, unrecognised, live_runs)


def _models_of(catalog: Catalog, run_id: str) -> list[ModelRecord]:
    return [m for m in catalog.models.values() if m.source_run_id == run_id]


def _protected_prefixes(catalog: Catalog, keys: ArtifactKeys) -> dict[str, str]:
    """Key prefix -> the registered model version whose files lie there."""
    out: dict[str, str] = {}
    for v in catalog.versions:
        who = f"registered model {v.name!r} version {v.version}"
        for uri in (v.source, v.storage_location):
            if not uri:
                continue
            if uri.startswith("models:/"):
                model = catalog.models.get(uri[len("models:/"):].split("/")[0])
                prefix = keys.prefix(model.artifact_location) if model else None
            elif uri.startswith("runs:/"):
                run_id, _, path = uri[len("runs:/"):].partition("/")
                run = catalog.runs.get(run_id)
                base = keys.prefix(run.artifact_uri) if run else None
                prefix = base + path.strip("/") + "/" if base and path.strip("/") else base
            else:
                prefix = keys.prefix(uri)
            if prefix:
                out[prefix] = who
    return out


def _missing_owner(key: str, catalog: Catalog, root: str) -> tuple[str | None, str]:
    """For a key no row owns: whose it was, if the layout says so and that row is gone."""
    if not key.startswith(root + "/"):
        return None, ""
    parts = key[len(root) + 1:].split("/")
    if len(parts) < 2 or not parts[0].isdigit():
        return None, ""
    exp = parts[0]
    if exp not in catalog.experiments:
        return f"experiment {exp}", "the experiment is not in the database"
    if len(parts) >= 3 and RUN_ID.match(parts[1]) and parts[1] not in catalog.runs:
        return f"run {parts[1]}", "the run is not in the database"
    if len(parts) >= 4 and parts[1] == "models" and parts[2] not in catalog.models:
        return f"logged model {parts[2]}", "the logged model is not in the database"
    return None, ""


def checkpoint_leftovers(objects: list[StoredObject], run_prefix: str,
                          read_object: Callable[[str], bytes]) -> tuple[list[StoredObject], str | None]:
    """Objects under a run's ``checkpoints/`` in no manifest's folder and used by no manifest."""
    manifests = [o.key for o in objects if o.key.rsplit("/", 1)[-1] == tc.MANIFEST_NAME]
    used: set[str] = set()
    for key in manifests:
        try:
            used |= {run_prefix + path for path in tc.manifest_references(read_object(key))}
        except ValueError as exc:
            return [], f"{key[len(run_prefix):]}: {exc}"
    complete = {key[: -len(tc.MANIFEST_NAME)] for key in manifests}
    return [o for o in objects
            if o.key not in used and not any(a in complete for a in ancestors(o.key))], None
