"""``python -m mlstack.gc``: plan, print, and (unless ``--dry-run``) apply the stack's garbage collection.

Reads the stack's variables (the MLflow server's: database, S3 endpoint, bucket, the server's
bucket key), so it runs wherever the server could: ``make stack-gc`` natively, ``make gc`` in a
one-off container of the compose ``mlflow`` service.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlstack import settings as s
from mlstack.gc import plan as gc_plan
from mlstack.gc import trainer_contract as tc
from mlstack.gc.age import DEFAULT_OLDER_THAN, parse_age
from mlstack.gc.bucket import Bucket
from mlstack.gc.catalog import TrackingDatabase
from mlstack.gc.records import Catalog


def human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def describe(r: gc_plan.Removal) -> str:
    parts = [f"{len(r.objects)} object(s)"] if r.objects or not r.uploads else []
    if r.uploads:
        parts.append(f"{len(r.uploads)} pending upload(s)")
    parts[-1] += f", {human(r.size)}"
    if r.row:
        parts.append("and its database rows")
    return f"{r.kind} {r.ident} ({r.reason}): {', '.join(parts)}"


def still_leftovers(removal: gc_plan.Removal, db: TrackingDatabase, bucket: Bucket, catalog: Catalog,
                    keys: gc_plan.ArtifactKeys) -> list:
    """The planned leftovers that are leftovers still: lease free now, unchanged, not in a manifest's folder.

    A trainer that resumes the run writes its lease first and waits a couple of seconds before it
    uploads anything, so once the lease reads free here, the fresh listing below is not racing it.
    """
    run_id = removal.recheck_run
    if tc.lease_state(db.lease_tag(run_id), time.time()) != "free":
        return []
    run_prefix = keys.prefix(catalog.runs[run_id].artifact_uri)
    fresh = bucket.objects(run_prefix + tc.CHECKPOINTS_ROOT + "/")
    still, problem = gc_plan.checkpoint_leftovers(fresh, run_prefix, bucket.read)
    if problem:
        return []
    now = {o.key: o for o in still}
    return [o for o in removal.objects if o.key in now and now[o.key].etag == o.etag and now[o.key].size == o.size]


def run_gc(*, older_than: str, dry_run: bool, env: dict[str, str] | None = None, out=sys.stdout) -> gc_plan.Plan:
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731
    min_age = parse_age(older_than)
    started = time.monotonic()
    bucket = Bucket.from_env(env)
    db = TrackingDatabase.from_env(env)
    keys = gc_plan.ArtifactKeys(bucket.name, s.ARTIFACTS_KEY_PREFIX)

    say(f"gc: reading bucket {bucket.name} ...")
    # The bucket first, the database second: see make_plan.
    objects, uploads = bucket.objects(), bucket.uploads()
    catalog = db.read()
    now = time.time()
    say(f"gc: {len(objects)} objects ({human(sum(o.size for o in objects))}), {len(uploads)} pending upload(s); "
        f"{len(catalog.runs)} runs, {len(catalog.models)} logged models, {len(catalog.experiments)} experiments "
        f"(read in {time.monotonic() - started:.1f} s)")
    plan = gc_plan.make_plan(objects, uploads, catalog, now=now, min_age=min_age, keys=keys, read_object=bucket.read)
    say(f"gc: removing what was deleted or orphaned more than {older_than} ago; never anything of a live run "
        f"({plan.live_runs} live now)")
    for line in plan.kept:
        say(f"  kept: {line}")
    if plan.unrecognised:
        say(f"  kept: {plan.unrecognised} object(s) gc does not recognise the place of (traces, foreign layouts)")
    if dry_run:
        for i, r in enumerate(plan.removals, 1):
            say(f"  [{i}/{len(plan.removals)}] would remove {describe(r)}")
        total = sum(r.size for r in plan.removals)
        say(f"gc: dry run: would free {human(total)} in {sum(len(r.objects) for r in plan.removals)} object(s) "
            f"and {sum(len(r.uploads) for r in plan.removals)} pending upload(s); nothing was changed "
            f"({time.monotonic() - started:.1f} s)")
        return plan

    freed = objects_removed = uploads_aborted = rows = 0
    for i, r in enumerate(plan.removals, 1):
        if r.requires_deleted and not db.still_deleted(*r.requires_deleted):
            say(f"  [{i}/{len(plan.removals)}] skipped {r.kind} {r.ident}: restored since the plan")
            continue
        if r.recheck_run:
            r.objects = still_leftovers(r, db, bucket, catalog, keys)
            if not r.objects:
                say(f"  [{i}/{len(plan.removals)}] skipped {r.kind} of run {r.ident}: the run was taken up again")
                continue
        say(f"  [{i}/{len(plan.removals)}] removing {describe(r)}")
        for upload in r.uploads:
            bucket.abort(upload)
        bucket.delete(o.key for o in r.objects)
        if r.row:  # rows last: a gc cut short leaves the row, and the next gc finishes the job
            db.hard_delete(*r.row)
            rows += 1
        freed += r.size
        objects_removed += len(r.objects)
        uploads_aborted += len(r.uploads)
    say(f"gc: removed {objects_removed} object(s) and {uploads_aborted} pending upload(s), freed {human(freed)}; "
        f"{rows} run/model/experiment record(s) deleted; done in {time.monotonic() - started:.1f} s")
    if s.S3_BACKEND.get(env) == "seaweedfs":
        say("gc: SeaweedFS returns the space of deleted objects to the disk when it vacuums its volumes "
            "(automatically, once a volume is 30% garbage)")
    return plan


def native_environment(args: argparse.Namespace) -> dict[str, str] | None:
    """The native stack's variables, as its launcher hands them to the MLflow server."""
    if not args.state_dir:
        return None
    from mlstack.native.stack import Stack

    stack = Stack(Path(args.state_dir), Path(args.env_file) if args.env_file else None)
    down = [name for name in ("postgres", "s3") if not stack.status().get(name, {}).get("running")]
    if down:
        raise ValueError(f"{', '.join(down)} of the native stack in {args.state_dir} is not running: "
                         "start it with `make stack`")
    return stack.environment()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlstack.gc",
        description="Remove deleted runs, logged models and experiments older than an age, with their "
                    "objects, and objects no run or model owns. Never anything of a live run.")
    parser.add_argument("--older-than", default=DEFAULT_OLDER_THAN,
                        help=f"only what was deleted (or written, for orphans) longer ago than this: "
                             f"30d, 12h, 1d12h, 90m, 0s (default {DEFAULT_OLDER_THAN})")
    parser.add_argument("--dry-run", action="store_true", help="list what would go and change nothing")
    parser.add_argument("--state-dir", help="collect the native stack kept in this directory (make stack-gc); "
                        "without it the stack's variables come from the environment (compose's mlflow service)")
    parser.add_argument("--env-file", default=".env" if Path(".env").exists() else None,
                        help="with --state-dir: the file of NAME=value settings (default: .env when present)")
    args = parser.parse_args(argv)
    try:
        parse_age(args.older_than)
        run_gc(older_than=args.older_than, dry_run=args.dry_run, env=native_environment(args))
    except (ValueError, s.SettingsError) as exc:
        print(f"gc: {exc}", file=sys.stderr)
        return 2
    return 0
