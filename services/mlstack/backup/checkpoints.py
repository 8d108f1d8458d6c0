"""No restored checkpoint looks complete when it is not.

The trainer calls a checkpoint complete when its folder holds ``manifest.json``, which it uploads
last, once every file the manifest lists is stored (trainer/mltrainer/manifest.py owns that
format; tests/unit/test_backup_checkpoints.py holds this reader to it). A backup copies a bucket
that may be changing: a checkpoint being uploaded, another being evicted by retention. So after
the copy every checkpoint manifest in the backup is checked against the bytes the backup really
holds: each file it lists (its ``stored_at``, relative to the run's artifact root; a deduplicated
file lives under another checkpoint of the same run) must be in the backup with the manifest's
size and sha256. A manifest that fails is left out of the backup; its checkpoint's files are
kept and come back without a manifest, which the trainer treats as an unfinished upload.

Only manifests are judged. Any other object is kept as it was copied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from mlstack.backup.bucket import StoredObject

MANIFEST_NAME = "manifest.json"  # mltrainer.manifest.MANIFEST_NAME
MANIFEST_FORMAT = 1  # mltrainer.manifest.MANIFEST_FORMAT


@dataclass(frozen=True)
class Dropped:
    key: str
    reason: str


def _is_checkpoint_manifest(data: object) -> bool:
    """Could the trainer read this as a checkpoint manifest? Everything it would accept is judged
    (its reader, mltrainer.manifest.Manifest.from_dict, demands at least these fields)."""
    return (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(data.get("files"), list)
            and isinstance(data.get("store_path"), str) and bool(data["store_path"].strip("/")))


def problems_of(manifest_key: str, manifest_bytes: bytes, held: dict[str, StoredObject]) -> str | None:
    """Why the checkpoint manifest at ``manifest_key`` must not be restored; None when it may.

    ``held``: every object of the backup by key.
    """
    try:
        data = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # unreadable: the trainer already treats its checkpoint as incomplete
    if not _is_checkpoint_manifest(data):
        return None
    # The run's artifact root: the manifest sits at <root><store_path>/manifest.json, and its
    # files' stored_at are relative to that root. One stored anywhere else cannot be checked.
    suffix = f"{data['store_path'].strip('/')}/{MANIFEST_NAME}"
    if not (manifest_key == suffix or manifest_key.endswith("/" + suffix)):
        return f"its store_path {data['store_path']!r} is not the folder it is stored in"
    root, files = manifest_key[: len(manifest_key) - len(suffix)], data["files"]
    for entry in files:
        if not isinstance(entry, dict) or not isinstance(entry.get("stored_at"), str):
            return f"a malformed file entry {entry!r}"
        key = root + entry["stored_at"]
        obj = held.get(key)
        if obj is None:
            return f"{key} is not in the backup (not yet uploaded, or deleted while the backup ran)"
        if obj.size != entry.get("size") or obj.sha256 != entry.get("sha256"):
            return (f"{key} in the backup ({obj.size} bytes, sha256 {obj.sha256[:12]}...) is not the file "
                    f"the manifest lists ({entry.get('size')} bytes, sha256 {str(entry.get('sha256'))[:12]}...)")
    return None


def incomplete_manifests(objects: list[StoredObject], read: Callable[[StoredObject], bytes]) -> list[Dropped]:
    """The checkpoint manifests among ``objects`` that would make an incomplete checkpoint look complete."""
    held = {obj.key: obj for obj in objects}
    dropped = []
    for obj in objects:
        if obj.key == MANIFEST_NAME or obj.key.endswith("/" + MANIFEST_NAME):
            reason = problems_of(obj.key, read(obj), held)
            if reason is not None:
                dropped.append(Dropped(obj.key, reason))
    return dropped
