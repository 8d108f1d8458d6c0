"""A backup on disk: one directory, its ``manifest.json``, and the checksum of every file in it.

    backups/20261125T203000Z/
        manifest.json          versions, sizes, sha256 of every file below
        tracking.dump          pg_dump of the tracking database (runs, metrics, registry)
        auth.dump              pg_dump of the auth database (users, permissions)
        objects/ab/ab12...     each object of the bucket, named by its sha256

A backup is written under a hidden ``.<name>.partial`` name and renamed when its manifest is
written, so an interrupted backup never looks like one.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from mlstack.backup.bucket import StoredObject, content_path, file_sha256
from mlstack.backup.targets import BackupError

FORMAT = 1
MANIFEST = "manifest.json"
OBJECTS = "objects"
DEFAULT_ROOT = "backups"


def dump_name(role: str) -> str:
    return f"{role}.dump"


def new_backup_dir(root: Path) -> tuple[Path, Path]:
    """``(partial directory to write, final name)`` of a new backup under ``root``."""
    name = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    final = root / name
    partial = root / f".{name}.partial"
    if final.exists() or partial.exists():
        raise BackupError(f"{final} already exists: wait a second and run the backup again")
    partial.mkdir(parents=True)
    return partial, final


def source_commit(repo: Path) -> dict[str, object]:
    """The commit of this checkout, and whether it has uncommitted changes (None outside git)."""
    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "uncommitted_changes": bool(status) if head else None}


def write_manifest(partial: Path, final: Path, manifest: dict) -> Path:
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.rename(partial, final)
    return final


def read_manifest(backup: Path) -> dict:
    path = backup / MANIFEST
    if not path.is_file():
        raise BackupError(f"{backup} is not a backup: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BackupError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: unsupported backup format {manifest.get('format')!r} (this tool reads {FORMAT})")
    return manifest


def objects_of(manifest: dict) -> list[StoredObject]:
    return [StoredObject(**o) for o in manifest["bucket"]["objects"]]


def object_entries(objects: list[StoredObject]) -> list[dict]:
    return [asdict(o) for o in sorted(objects, key=lambda o: o.key)]


def problems(backup: Path, manifest: dict) -> list[str]:
    """Every file the manifest lists, re-read and compared with its size and sha256."""
    found = []
    for role, entry in manifest["databases"].items():
        path = backup / entry["file"]
        if not path.is_file():
            found.append(f"{entry['file']} ({role} database dump) is missing")
        elif path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            found.append(f"{entry['file']} ({role} database dump) does not match its checksum")
    checked: set[str] = set()
    for obj in objects_of(manifest):
        if obj.sha256 in checked:
            continue
        checked.add(obj.sha256)
        path = content_path(backup / OBJECTS, obj.sha256)
        if not path.is_file():
            found.append(f"{path.relative_to(backup)} (object {obj.key}) is missing")
        elif path.stat().st_size != obj.size or file_sha256(path) != obj.sha256:
            found.append(f"{path.relative_to(backup)} (object {obj.key}) does not match its checksum")
    return found
