"""Checkpoint manifests: the list of files, sizes and checksums that makes a checkpoint whole.

A checkpoint in the store is trusted only once its manifest is there, and the manifest is
uploaded last; so a crash mid-upload leaves a checkpoint without a manifest, which readers
treat as absent. Each entry says where its bytes are stored (``stored_at``). The uploader today
stores every file inside the checkpoint's own folder (an unchanged file is copied there by the
server, not sent again: see uploader), so a folder is whole on its own. Manifests written before
that point at an identical object in an older folder instead (deduplication by reference, as W&B
artifacts do); ``build_manifest(stored_digests=...)`` still writes that form, and every reader
(resume, verify, retention, backups, gc) follows ``stored_at`` either way.

Each file has two checksums, taken in one read: sha256, its identity for deduplication, and
CRC-32, which a download is checked against (a third of the CPU; see ``checksum``). Manifests
written before CRC-32 was recorded have none; their downloads are checked by sha256.

Pure: this module reads local files to hash them, and never talks to the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from mltrainer.checksum import crc32_hex

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK_SIZE = 1 << 20  # 1 MiB: bounded memory for multi-GB weight files

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CRC32 = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    crc32: str
    size: int


def file_digest(path: Path) -> FileDigest:
    """sha256, CRC-32 and size of ``path``, read once in 1 MiB chunks."""
    h = hashlib.sha256()
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileDigest(sha256=h.hexdigest(), crc32=crc32_hex(crc), size=size)


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a checkpoint: where it sits in the checkpoint and where its bytes are stored."""

    path: str  # relative posix path inside the checkpoint folder
    size: int
    sha256: str
    stored_at: str  # store path of the object holding these bytes (may be another checkpoint's)
    crc32: str | None = None  # absent in manifests written before it was recorded

    @property
    def check(self) -> tuple[str, str]:
        """``(algorithm, expected hex)`` a download of this file is checked against."""
        return ("crc32", self.crc32) if self.crc32 is not None else ("sha256", self.sha256)

    def to_dict(self) -> dict[str, Any]:
        data = {"path": self.path, "size": self.size, "sha256": self.sha256, "stored_at": self.stored_at}
        if self.crc32 is not None:
            data["crc32"] = self.crc32
        return data


@dataclass(frozen=True)
class Manifest:
    """Everything needed to check, download and deduplicate one stored checkpoint."""

    step: int
    metrics: dict[str, float | None]
    store_path: str
    created_at: str
    files: tuple[ManifestEntry, ...] = field(default_factory=tuple)
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def files_to_upload(self) -> list[ManifestEntry]:
        """Entries whose bytes belong under this checkpoint's own store path (not deduplicated)."""
        prefix = self.store_path.rstrip("/") + "/"
        return [e for e in self.files if e.stored_at.startswith(prefix)]

    def digest_index(self) -> dict[str, str]:
        """``sha256 -> stored_at`` of this checkpoint's files, to pass as ``stored_digests`` next time."""
        return {e.sha256: e.stored_at for e in self.files}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "step": self.step,
            "metrics": dict(self.metrics),
            "store_path": self.store_path,
            "created_at": self.created_at,
            "files": [e.to_dict() for e in self.files],
            "total_bytes": self.total_bytes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest; ``ValueError`` says what is corrupt."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"corrupt manifest: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        def bad(msg: str) -> ValueError:
            return ValueError(f"corrupt manifest: {msg}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != MANIFEST_FORMAT:
            raise bad(f"unsupported format {data.get('format')!r} (expected {MANIFEST_FORMAT})")
        missing = [k for k in ("step", "metrics", "store_path", "created_at", "files", "total_bytes") if k not in data]
        if missing:
            raise bad(f"missing field(s) {', '.join(missing)}")
        if not _is_int(data["step"]) or data["step"] < 0:
            raise bad(f"'step' must be a non-negative integer, got {data['step']!r}")
        if not isinstance(data["store_path"], str) or not data["store_path"]:
            raise bad(f"'store_path' must be a non-empty string, got {data['store_path']!r}")
        if not isinstance(data["created_at"], str):
            raise bad("'created_at' must be a string")
        metrics = data["metrics"]
        if not isinstance(metrics, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values()
        ):
            raise bad("'metrics' must map names to numbers or null")
        if not isinstance(data["files"], list):
            raise bad("'files' must be a list")
        entries = []
        seen: set[str] = set()
        for i, item in enumerate(data["files"]):
            if not isinstance(item, dict):
                raise bad(f"files[{i}] must be an object")
            path, size, digest, stored_at, crc = (item.get(k) for k in ("path", "size", "sha256", "stored_at", "crc32"))
            if not isinstance(path, str) or not _is_safe_relpath(path):
                raise bad(f"files[{i}].path must be a relative path without '..', got {path!r}")
            if path in seen:
                raise bad(f"files[{i}].path {path!r} is listed twice")
            seen.add(path)
            if not _is_int(size) or size < 0:
                raise bad(f"files[{i}].size must be a non-negative integer, got {size!r}")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise bad(f"files[{i}].sha256 must be 64 lowercase hex characters, got {digest!r}")
            if not isinstance(stored_at, str) or not stored_at:
                raise bad(f"files[{i}].stored_at must be a non-empty string, got {stored_at!r}")
            if crc is not None and (not isinstance(crc, str) or not _CRC32.match(crc)):
                raise bad(f"files[{i}].crc32 must be 8 lowercase hex characters, got {crc!r}")
            entries.append(ManifestEntry(path=path, size=size, sha256=digest, stored_at=stored_at, crc32=crc))
        manifest = cls(
            step=data["step"],
            metrics={str(k): (None if v is None else float(v)) for k, v in metrics.items()},
            store_path=data["store_path"],
            created_at=data["created_at"],
            files=tuple(entries),
        )
        if data["total_bytes"] != manifest.total_bytes:
            raise bad(f"'total_bytes' is {data['total_bytes']!r} but the files add up to {manifest.total_bytes}")
        return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_safe_relpath(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _json_metric(value: Any) -> float | None:
    """Metrics as JSON numbers; anything non-finite or non-numeric becomes null."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def iter_checkpoint_files(folder: Path) -> Iterable[tuple[str, Path]]:
    """``(relative posix path, local path)`` of every file under ``folder``, sorted by path.

    Symlinks to files are followed (their content is what a loader would read); symlinks to
    directories are skipped, which also rules out cycles.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in filenames:
            local = base / name
            found.append((PurePosixPath(local.relative_to(folder)).as_posix(), local))
    return sorted(found)


def checkpoint_files(folder: Path) -> list[tuple[str, Path]]:
    """``iter_checkpoint_files`` of a folder that can be stored as a checkpoint.

    Raises:
        ValueError: if the folder is missing or already holds a file named ``manifest.json``,
            which would collide with the manifest in the store.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist or is not a directory")
    files = list(iter_checkpoint_files(folder))
    if any(relpath == MANIFEST_NAME for relpath, _ in files):
        raise ValueError(f"checkpoint folder {str(folder)!r} contains {MANIFEST_NAME!r}, a reserved name")
    return files


def build_manifest(
    folder: Path,
    *,
    step: int,
    metrics: Mapping[str, Any] | None,
    store_path: str,
    stored_digests: Mapping[str, str] | None = None,
    created_at: datetime | None = None,
    digests: Mapping[str, FileDigest] | None = None,
    elsewhere: Mapping[str, FileDigest] | None = None,
) -> Manifest:
    """Hash every file in ``folder`` and describe it as the checkpoint at ``store_path``.

    ``stored_digests`` maps sha256 -> store path of an identical object already stored in this
    run; such files get that path as ``stored_at`` and are not uploaded again. All others get
    ``f"{store_path}/{relpath}"``. ``created_at`` defaults to now (UTC). ``digests`` (relative
    path -> ``file_digest``) spares hashing the files a caller already hashed. ``elsewhere``
    (relative path -> digest) lists files of this checkpoint that are not in ``folder``: those
    another node of a multi-node training stored under ``store_path`` (mltrainer.nodes).

    Raises:
        ValueError: as ``checkpoint_files``.
    """
    store_path = store_path.rstrip("/")
    stored_digests = stored_digests or {}
    digests = digests or {}
    entries = []
    for relpath, local in checkpoint_files(folder):
        digest = digests.get(relpath) or file_digest(local)
        stored_at = stored_digests.get(digest.sha256, f"{store_path}/{relpath}")
        entries.append(ManifestEntry(path=relpath, size=digest.size, sha256=digest.sha256, stored_at=stored_at,
                                     crc32=digest.crc32))
    local_paths = {e.path for e in entries}
    for relpath, digest in (elsewhere or {}).items():
        if relpath in local_paths or relpath == MANIFEST_NAME or not _is_safe_relpath(relpath):
            raise ValueError(f"{store_path}: file {relpath!r} of another node is also local, reserved or unsafe")
        entries.append(ManifestEntry(path=relpath, size=digest.size, sha256=digest.sha256,
                                     stored_at=f"{store_path}/{relpath}", crc32=digest.crc32))
    entries.sort(key=lambda e: e.path)
    when = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return Manifest(
        step=step,
        metrics={str(k): _json_metric(v) for k, v in (metrics or {}).items()},
        store_path=store_path,
        created_at=when.isoformat().replace("+00:00", "Z"),
        files=tuple(entries),
    )
