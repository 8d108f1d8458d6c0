"""``python -m mlstack.backup create|restore|verify`` (make backup/restore, make stack-backup/stack-restore)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mlstack.backup import layout
from mlstack.backup.targets import ComposeTarget, NativeTarget


def _target(args: argparse.Namespace):
    env_file = Path(args.env_file) if args.env_file else None
    if args.compose:
        return ComposeTarget(args.compose, env_file)
    return NativeTarget(Path(args.state_dir), env_file)


def cmd_create(args: argparse.Namespace) -> int:
    from mlstack.backup.create import create

    started = time.monotonic()
    backup = create(_target(args), Path(args.into))
    print(f"backup written to {backup} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from mlstack.backup.restore import restore

    started = time.monotonic()
    steps = restore(Path(args.backup), _target(args))
    print(f"restored {args.backup} in {time.monotonic() - started:.1f}s "
          f"({', '.join(f'{step} {seconds:.1f}s' for step, seconds in steps.items())})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    backup = Path(args.backup)
    manifest = layout.read_manifest(backup)
    found = layout.problems(backup, manifest)
    if found:
        print(f"{backup} is damaged:", *(f"  - {p}" for p in found), sep="\n", file=sys.stderr)
        return 1
    count = len(manifest["bucket"]["objects"])
    print(f"{backup}: both database dumps and {count:,} objects match their checksums "
          f"(MLflow {manifest['mlflow_version']}, taken {manifest['created_at']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlstack.backup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="back up both databases and the whole bucket into <into>/<UTC time>/")
    create.add_argument("--into", default=layout.DEFAULT_ROOT, help="directory the backup is made in (default: backups)")
    restore = sub.add_parser("restore", help="restore a backup onto an empty stack of the same MLflow version")
    restore.add_argument("backup", help="the backup directory (backups/<UTC time>)")
    for p in (create, restore):
        p.add_argument("--compose", metavar="COMMAND",
                       help="the compose stack that this command drives (e.g. 'docker compose --env-file .env "
                            "-f docker-compose.yml'); without it, the native stack")
        p.add_argument("--state-dir", default=os.environ.get("STACK_STATE_DIR", ".stack"),
                       help="the native stack's state directory (default: $STACK_STATE_DIR or .stack)")
        p.add_argument("--env-file", default=".env" if Path(".env").exists() else None,
                       help="file of NAME=value settings (default: .env when present)")
    verify = sub.add_parser("verify", help="re-read every file of a backup and compare it with its checksum")
    verify.add_argument("backup", help="the backup directory")
    for name, func in (("create", cmd_create), ("restore", cmd_restore), ("verify", cmd_verify)):
        sub.choices[name].set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RuntimeError as exc:  # BackupError, and the native launcher's StackError when a restart fails
        print(f"backup {args.command}: {exc}", file=sys.stderr)
        return 1
