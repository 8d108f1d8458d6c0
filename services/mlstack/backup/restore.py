"""Restore a backup onto an empty stack of the same MLflow version.

Refused, before anything is changed, when the backup does not match its checksums, when the
target's databases are at another schema revision than the dumps (another MLflow version: restore
with the version the backup was taken with, then upgrade), or when the target holds anything a
restore would overwrite. Then: the MLflow server is stopped, the bucket's objects are uploaded,
both databases are replaced by their dumps, and the server is started again.

The stack's own two accounts (MLFLOW_ADMIN_USER, MLFLOW_TRAINER_USER) take the target's
configured passwords, as they do at every start of a stack; every other account, its password and
every permission come back as they were.
"""

from __future__ import annotations

import time
from pathlib import Path

from werkzeug.security import generate_password_hash

from mlstack.backup import bucket, layout, postgres
from mlstack.backup.targets import BackupError, Target

# Every fresh stack has MLflow's "Default" experiment; anything beyond is someone's data.
DEFAULT_EXPERIMENT_ID = "0"


def what_target_holds(target: Target) -> list[str]:
    """What a restore would overwrite; [] for a stack as `make stack`/`make up` leaves it."""
    held = []
    tracking = target.databases.tracking
    counts = {
        "experiment(s) besides Default": f"SELECT count(*) FROM experiments WHERE experiment_id <> {DEFAULT_EXPERIMENT_ID};",
        "run(s)": "SELECT count(*) FROM runs;",
        "registered model(s)": "SELECT count(*) FROM registered_models;",
    }
    for what, sql in counts.items():
        (count,), = postgres.query(target, tracking, sql)
        if int(count) > 0:
            held.append(f"{count} {what} in database {tracking}")
    own = (target.admin_user, target.trainer_user)
    users = [row[0] for row in postgres.query(target, target.databases.auth, "SELECT username FROM users ORDER BY 1;")
             if row[0] not in own]
    if users:
        held.append(f"user(s) {', '.join(users)} in database {target.databases.auth}")
    if bucket.has_objects(target.s3(), target.bucket):
        held.append(f"objects in bucket {target.bucket}")
    return held


def check(backup: Path, target: Target) -> dict:
    manifest = layout.read_manifest(backup)
    damaged = layout.problems(backup, manifest)
    if damaged:
        raise BackupError(f"{backup} is damaged, nothing was restored:\n" + "\n".join(f"  - {p}" for p in damaged))
    target.check_running()
    # The schema decides, not the version string: a dump loads into the schema it was taken from,
    # and a server runs on the schema its MLflow migrates to. (An upgrade backs up old-schema data
    # with the new MLflow already installed; patch releases share a schema.)
    version = target.mlflow_version()
    for role, name in target.databases.by_role().items():
        theirs = manifest["databases"][role]["schema_revision"]
        ours = postgres.schema_revision(target, name, role)
        if theirs != ours:
            raise BackupError(
                f"{backup} holds a {role} database at schema revision {theirs} (taken with MLflow "
                f"{manifest['mlflow_version']}) and this {target.kind} stack's is at {ours} (MLflow {version}), "
                f"nothing was restored: restore onto a stack of the MLflow the backup was taken with, then upgrade it")
    held = what_target_holds(target)
    if held:
        raise BackupError(f"the {target.kind} stack is not empty, nothing was restored: it holds "
                          + "; ".join(held) + ". Restore onto a fresh stack (see README, Backup and restore)")
    return manifest


def _own_accounts_sql(target: Target) -> str:
    """SQL giving the stack's own accounts the target's passwords, hashed as MLflow hashes them."""
    return "".join(
        f"UPDATE users SET password_hash = {postgres.quote_literal(generate_password_hash(password))} "
        f"WHERE username = {postgres.quote_literal(user)};\n"
        for user, password in ((target.admin_user, target.admin_password), (target.trainer_user, target.trainer_password)))


def restore(backup: Path, target: Target, say=print) -> dict[str, float]:
    manifest = check(backup, target)
    timings: dict[str, float] = {}
    target.stop_server()

    started = time.monotonic()
    objects = layout.objects_of(manifest)
    bucket.copy_in(target.s3(), target.bucket, objects, backup / layout.OBJECTS)
    timings["upload bucket"] = round(time.monotonic() - started, 2)
    say(f"uploaded {len(objects):,} objects ({manifest['bucket']['total_bytes']:,} bytes) to bucket {target.bucket}")

    for role, name in target.databases.by_role().items():
        started = time.monotonic()
        postgres.replace(target, name, backup / manifest["databases"][role]["file"])
        timings[f"restore {role} database"] = round(time.monotonic() - started, 2)
        say(f"restored the {role} database {name}")
    postgres.execute(target, target.databases.auth, _own_accounts_sql(target))

    started = time.monotonic()
    target.start_server()
    timings["start server"] = round(time.monotonic() - started, 2)
    return timings
