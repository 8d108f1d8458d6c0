"""Copy every object of a bucket into a backup directory, and back into an empty bucket.

Objects are stored by content (``objects/<sha256[:2]>/<sha256>``), not by key: any key S3 accepts
is safe on disk (no ``..``, no trailing ``/``, no length limit), identical objects (a checkpoint's
tokenizer in every run) are stored once, and every file's name is its own checksum.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

CHUNK = 1 << 20
# Parallel transfers: they wait on the network and the disk, not on the CPU.
TRANSFER_WORKERS = 8


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def content_path(objects_dir: Path, sha256: str) -> Path:
    return objects_dir / sha256[:2] / sha256


def list_keys(s3, bucket: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def has_objects(s3, bucket: str) -> bool:
    return bool(s3.list_objects_v2(Bucket=bucket, MaxKeys=1).get("Contents"))


def _download(s3, bucket: str, key: str, objects_dir: Path) -> StoredObject | None:
    """The object's bytes into the content store; None when it was deleted since the listing."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=objects_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := body.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        final = content_path(objects_dir, digest.hexdigest())
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)  # an identical object stored before is simply overwritten
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return StoredObject(key, size, digest.hexdigest())


def copy_out(s3, bucket: str, keys: list[str], objects_dir: Path) -> tuple[list[StoredObject], list[str]]:
    """Download ``keys``; returns what was stored and the keys that no longer existed."""
    objects_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(TRANSFER_WORKERS, thread_name_prefix="backup-get") as pool:
        results = list(pool.map(lambda key: (key, _download(s3, bucket, key, objects_dir)), keys))
    stored = [obj for _, obj in results if obj is not None]
    vanished = [key for key, obj in results if obj is None]
    return stored, vanished


def copy_in(s3, bucket: str, objects: list[StoredObject], objects_dir: Path) -> None:
    """Upload every object under its key (multipart for large ones, as boto3 decides)."""

    def upload(obj: StoredObject) -> None:
        s3.upload_file(str(content_path(objects_dir, obj.sha256)), bucket, obj.key)

    with ThreadPoolExecutor(TRANSFER_WORKERS, thread_name_prefix="restore-put") as pool:
        list(pool.map(upload, objects))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
