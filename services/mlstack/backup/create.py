"""Take a backup of a running stack, while training may go on.

Order: the two databases first, then the bucket. What that guarantees for a backup taken during
writes:

- Each database is one consistent snapshot (pg_dump), taken at its own moment; tracking first,
  then auth, seconds apart. A user or permission changed between the two dumps is in one or not.
- Everything the tracking snapshot refers to was written to the bucket before the snapshot
  (MLflow stores an artifact, then records it; the trainer uploads a checkpoint, then sets its
  tags), and the bucket copy starts after it: so every artifact, checkpoint and model version the
  restored database names is in the backup, unless it was deleted while the backup ran (retention
  evicting an old checkpoint, gc, a user deleting a run). The reverse order would lose more:
  every run, metric and model version recorded during the bucket copy would point at objects the
  backup lacks.
- Objects written after the snapshot (an upload in flight, a run started meanwhile) may be in the
  bucket copy without a row that owns them: harmless leftovers that ``make gc`` removes.
- Checkpoints: a checkpoint manifest is kept only when every file it lists is in the backup with
  the manifest's size and sha256 (``checkpoints``); otherwise it is left out and the checkpoint
  comes back as an unfinished upload, which the trainer never resumes from. A restored checkpoint
  that looks complete therefore is complete, even when the backup ran mid-upload.
- Metrics logged after the snapshot are not in the backup: a run restored mid-training has its
  metrics up to the snapshot, and resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from mlstack.backup import bucket, checkpoints, layout, postgres
from mlstack.backup.targets import REPO, Target


def create(target: Target, root: Path, say=print) -> Path:
    target.check_running()
    partial, final = layout.new_backup_dir(root)
    timings: dict[str, float] = {}
    version = target.mlflow_version()

    databases = {}
    for role, name in target.databases.by_role().items():
        started = time.monotonic()
        revision = postgres.schema_revision(target, name, role)
        path = partial / layout.dump_name(role)
        postgres.dump(target, name, path)
        timings[f"dump {role} database"] = round(time.monotonic() - started, 2)
        databases[role] = {"database": name, "file": path.name, "size": path.stat().st_size,
                           "sha256": bucket.file_sha256(path), "schema_revision": revision}
        say(f"dumped the {role} database {name} ({path.stat().st_size:,} bytes)")

    started = time.monotonic()
    s3 = target.s3()
    keys = bucket.list_keys(s3, target.bucket)
    objects_dir = partial / layout.OBJECTS
    objects, vanished = bucket.copy_out(s3, target.bucket, keys, objects_dir)
    timings["copy bucket"] = round(time.monotonic() - started, 2)

    dropped = checkpoints.incomplete_manifests(
        objects, lambda obj: bucket.content_path(objects_dir, obj.sha256).read_bytes())
    dropped_keys = {d.key for d in dropped}
    kept = [o for o in objects if o.key not in dropped_keys]
    for sha in {o.sha256 for o in objects if o.key in dropped_keys} - {o.sha256 for o in kept}:
        bucket.content_path(objects_dir, sha).unlink()
    for d in dropped:
        say(f"left out {d.key}: {d.reason}")
    total = sum(o.size for o in kept)
    say(f"copied {len(kept):,} objects ({total:,} bytes) of bucket {target.bucket}")

    manifest = {
        "format": layout.FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "source": {"kind": target.kind, **layout.source_commit(REPO)},
        "mlflow_version": version,
        "databases": databases,
        "bucket": {
            "name": target.bucket,
            "object_count": len(kept),
            "total_bytes": total,
            "objects": layout.object_entries(kept),
            # Listed, then deleted before it was copied (retention, gc): not in the backup.
            "vanished_during_backup": sorted(vanished),
            "checkpoint_manifests_left_out": [{"key": d.key, "reason": d.reason} for d in dropped],
        },
        "timings_seconds": timings,
    }
    return layout.write_manifest(partial, final, manifest)
