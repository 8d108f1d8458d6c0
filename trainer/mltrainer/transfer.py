"""Moving checkpoint files between this machine and a run's artifact store.

A large file goes straight to S3 when the server offers it (its ``/server-info`` says so when
``S3_PUBLIC_ENDPOINT_URL`` is set): the server checks our permission and presigns one URL per
part (upload) or one URL for the object (download); the parts or byte ranges then move in
parallel, each on a kept-alive connection. Everything else, and everything when the server
offers nothing, is one streamed request through the MLflow server.

MLflow's own client has this feature too, but for files over 500 MB only, and its download reads
each 100 MB range into memory 10 KB at a time: at 2 cores that ran at half of boto3's speed
(bench/). Here a range is written to its place in the file as it arrives, and its CRC-32 taken
from the same bytes (``checksum``), so checking the download costs no second read.

The first failure of the direct path (an S3 endpoint this machine cannot reach, a URL signed for
another host) is reported once, and from then on this process uses the server: a checkpoint is
never lost because a shortcut did not work. A 404 is not such a failure: the object is missing
whichever way it is asked for, so it ends the download at once (``ArtifactMissingError``).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mltrainer.checksum import crc32_combine, crc32_hex, new_checksum
from mltrainer.manifest import file_digest

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
PART_SIZE = 8 * MiB  # S3 allows 5 MiB to 5 GiB; boto3's default too
DIRECT_MIN_SIZE = 16 * MiB  # below this, the extra round trips of presigning cost more than parallelism saves
CONCURRENCY = 8  # parts or ranges of one file in flight
MAX_PARTS = 10_000  # S3's limit on parts of one multipart upload
# Blocks of a download: each is read from the socket, checksummed and written while it is still
# in the core's cache. At 256 KiB a fresh process downloading 1 GB spent 1.0 CPU-s, at 1 MiB 2.1
# (more page faults too); 64 KiB pays Python's per-block overhead (bench/, 2 cores).
READ_SIZE = 256 * 1024
# Blocks of a proxied upload's body. urllib3 reads a file body 16 KiB at a time, and each block
# takes the GIL back twice (the read, the send). A trainer uploads beside its training thread,
# which holds the GIL most of the time: beside a busy thread, a 512 MB upload ran at 54 MB/s with
# 16 KiB blocks and 121 MB/s with these (idle: 177 and 179; bench/README.md, eighth round).
SEND_SIZE = 4 * MiB
TIMEOUT = (10, 300)  # connect, read (seconds)
# Server-side copies (mlstack.patches.artifact_copy): the request header naming the source, and the
# answer's header saying the server made the copy.
COPY_FROM_HEADER = "X-Mlstack-Copy-From"
COPIED_HEADER = "X-Mlstack-Copied"


class DirectTransferError(RuntimeError):
    """A part or range could not be moved straight to or from S3."""


class ArtifactMissingError(FileNotFoundError):
    """The store has no object at a path that should hold one (404 from the server or from S3).

    Final: no retry and no other route (direct or through the server) will find it, so none is
    tried. The message says what is missing; the caller says which file of what it was.
    """

    def __init__(self, remote_path: str):
        super().__init__(f"missing from the run's artifact store (404 Not Found): {remote_path}")
        self.remote_path = remote_path


def _raise_if_missing(resp, remote_path: str) -> None:
    if resp.status_code == 404:
        raise ArtifactMissingError(remote_path)


def part_ranges(size: int, part_size: int = PART_SIZE) -> list[tuple[int, int]]:
    """(offset, length) of each part; parts grow past ``part_size`` to stay within S3's 10,000."""
    part_size = max(part_size, -(-size // MAX_PARTS))
    return [(start, min(part_size, size - start)) for start in range(0, size, part_size)] or [(0, 0)]


class InFlightLimit:
    """How many transfers (parts of a file, files of a checkpoint) may run at once; changeable
    while they run.

    The uploader lowers it while training runs and keeps up: on a host whose cores also train
    (or also serve S3), eight parts at once take those cores in bursts, one at a time spreads
    the same work over the time between saves. It raises it when training waits for the
    uploads (the last checkpoint at the end, or a queue that filled up); raising it lets the
    transfers already waiting start at once.
    """

    def __init__(self, limit: int):
        self._limit = max(1, limit)
        self._active = 0
        self._changed = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def set(self, limit: int) -> None:
        with self._changed:
            self._limit = max(1, limit)
            self._changed.notify_all()

    def __enter__(self) -> InFlightLimit:
        with self._changed:
            self._changed.wait_for(lambda: self._active < self._limit)
            self._active += 1
        return self

    def __exit__(self, *_exc) -> None:
        with self._changed:
            self._active -= 1
            self._changed.notify_all()


class LargeBlocks:
    """A file as a request body that hands out ``SEND_SIZE`` bytes a read, whatever block size
    urllib3 asks for; requests still sends it with its Content-Length and can rewind it for a retry."""

    def __init__(self, file):
        self._file = file

    def read(self, _size: int = -1) -> bytes:
        return self._file.read(SEND_SIZE)

    def __iter__(self):  # what requests sends as a stream
        return iter(self.read, b"")

    def __len__(self) -> int:  # with tell(): requests' Content-Length is the size from here on
        return os.fstat(self._file.fileno()).st_size

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)


class RunArtifacts:
    """The artifact store of one run, as the uploader and resume use it."""

    def __init__(self, repo, *, concurrency: int = CONCURRENCY, part_size: int = PART_SIZE,
                 direct_min_size: int = DIRECT_MIN_SIZE):
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        self.repo = repo
        # Anything but the tracking server's HTTP store (a local file store) gets the repo's own calls.
        self._http = isinstance(repo, HttpArtifactRepository)
        self.concurrency = max(1, concurrency)
        self.part_limit = InFlightLimit(self.concurrency)  # upload parts; downloads always use all
        self.part_size = part_size
        self.direct_min_size = direct_min_size
        self._direct_disabled = False
        self._copy_unsupported = False  # the server answered a copy request without copying
        self._sessions = threading.local()

    @classmethod
    def for_artifact_uri(cls, artifact_uri: str, **kwargs) -> RunArtifacts:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return cls(get_artifact_repository(artifact_uri), **kwargs)

    @classmethod
    def of_run(cls, client, run_id: str, **kwargs) -> RunArtifacts:
        return cls.for_artifact_uri(client.get_run(run_id).info.artifact_uri, **kwargs)

    # -- what the server offers ------------------------------------------------------------------

    def _direct_offered(self, capability: str) -> bool:
        # MlflowArtifactsRepository asks /server-info once and caches the answer; an explicit
        # MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD/DOWNLOAD=false still wins, as for MLflow's client.
        check = getattr(self.repo, f"_is_multipart_{capability}_enabled", None)
        return self._http and not self._direct_disabled and check is not None and bool(check())

    def _give_up_direct(self, what: str, exc: BaseException) -> None:
        if not self._direct_disabled:
            logger.warning(
                "direct S3 transfer failed (%s: %s); this run now sends every byte through the MLflow "
                "server. If S3 is unreachable from here, the server's S3_PUBLIC_ENDPOINT_URL should "
                "name an address trainers reach (or be empty).", what, exc)
        self._direct_disabled = True

    def _session(self):
        import requests

        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = requests.Session()
        return session

    # -- upload ----------------------------------------------------------------------------------

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        if not self._http:
            self.repo.log_artifact(local_file, artifact_path)
            return
        if os.path.getsize(local_file) >= self.direct_min_size and self._direct_offered("upload"):
            try:
                self._upload_direct(local_file, artifact_path)
                return
            except Exception as exc:  # noqa: BLE001 - the proxied path below is the answer
                self._give_up_direct(f"upload of {os.path.basename(local_file)}", exc)
        self._upload_proxied(local_file, artifact_path)

    def _upload_proxied(self, local_file: str, artifact_path: str | None) -> None:
        from mlflow.utils.mime_type_utils import _guess_mime_type
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        name = os.path.basename(local_file)
        endpoint = posixpath.join("/", *([artifact_path] if artifact_path else []), name)
        with open(local_file, "rb") as body:
            resp = http_request(self.repo._host_creds, endpoint, "PUT", data=LargeBlocks(body),
                                extra_headers={"Content-Type": _guess_mime_type(name)})
            augmented_raise_for_status(resp)

    def _upload_direct(self, local_file: str, artifact_path: str | None) -> None:
        from mlflow.entities.multipart_upload import MultipartUploadPart

        ranges = part_ranges(os.path.getsize(local_file), self.part_size)
        create = self.repo.create_multipart_upload(local_file, len(ranges), artifact_path)
        fd = os.open(local_file, os.O_RDONLY)
        try:
            def put(index: int) -> MultipartUploadPart:
                credential = create.credentials[index]
                offset, length = ranges[index]
                with self.part_limit:
                    data = os.pread(fd, length, offset)
                    if len(data) != length:
                        raise DirectTransferError(f"{local_file} changed size while uploading")
                    resp = self._session().put(credential.url, data=data, headers=credential.headers or {},
                                               timeout=TIMEOUT)
                if resp.status_code >= 300:
                    raise DirectTransferError(f"part {credential.part_number}: HTTP {resp.status_code} "
                                              f"{resp.text[:200]}")
                return MultipartUploadPart(part_number=credential.part_number, etag=resp.headers.get("ETag", ""),
                                           url=credential.url)

            try:
                with ThreadPoolExecutor(self.concurrency, thread_name_prefix="part-upload") as pool:
                    parts = list(pool.map(put, range(len(ranges))))
                self.repo.complete_multipart_upload(local_file, create.upload_id, parts, artifact_path)
            except BaseException:
                try:
                    self.repo.abort_multipart_upload(local_file, create.upload_id, artifact_path)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    logger.debug("could not abort multipart upload %s", create.upload_id, exc_info=True)
                raise
        finally:
            os.close(fd)

    # -- server-side copy ------------------------------------------------------------------------

    def copy_within_run(self, source: str, artifact_path: str, name: str) -> bool:
        """Have the server copy ``source`` (a file of this run, relative to its root) to
        ``artifact_path/name``, inside S3; True when it did.

        False means no copy was made and the caller must send the bytes: the store is not the
        tracking server's (a local file store), or the server does not make copies (it answers
        without ``COPIED_HEADER``: an older server, which stored the empty body at the
        destination, to be overwritten by the upload that follows). Any other failure raises, as
        an upload does, so the caller's retries apply.
        """
        if not self._http or self._copy_unsupported:
            return False
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        endpoint = posixpath.join("/", artifact_path, name)
        resp = http_request(self.repo._host_creds, endpoint, "PUT", data=b"",
                            extra_headers={COPY_FROM_HEADER: source})
        _raise_if_missing(resp, source)
        augmented_raise_for_status(resp)
        if resp.headers.get(COPIED_HEADER) != "1":
            logger.warning("the MLflow server makes no server-side copies (mlstack's artifact_copy patch): "
                           "unchanged checkpoint files are sent again")
            self._copy_unsupported = True
            return False
        return True

    # -- download --------------------------------------------------------------------------------

    def download_file(self, remote_path: str, local_path: Path, size: int | None = None,
                      checksum: str = "sha256") -> str:
        """``remote_path`` (a file, relative to the run's root) to ``local_path``; returns the hex
        ``checksum`` ("sha256" or "crc32") of what arrived.

        The checksum is taken while the bytes arrive, so checking a download against its
        manifest costs no second pass over a file of gigabytes.
        """
        local_path = Path(local_path)
        new_checksum(checksum)  # an unknown name fails before any byte moves
        if not self._http:
            return self._download_other(remote_path, local_path, checksum)
        if (size is None or size >= self.direct_min_size) and self._direct_offered("download"):
            try:
                return self._download_direct(remote_path, local_path, checksum)
            except ArtifactMissingError:
                raise  # the server would answer the same: not a reason to stop going direct either
            except Exception as exc:  # noqa: BLE001 - the proxied path below is the answer
                self._give_up_direct(f"download of {remote_path}", exc)
        return self._download_proxied(remote_path, local_path, checksum)

    def _download_proxied(self, remote_path: str, local_path: Path, checksum: str) -> str:
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        digest = new_checksum(checksum)
        resp = http_request(self.repo._host_creds, posixpath.join("/", remote_path), "GET", stream=True)
        with resp:
            _raise_if_missing(resp, remote_path)
            augmented_raise_for_status(resp)
            with open(local_path, "wb") as out:
                for block in resp.iter_content(READ_SIZE):
                    out.write(block)
                    digest.update(block)
        return digest.hexdigest()

    def _download_other(self, remote_path: str, local_path: Path, checksum: str) -> str:
        with tempfile.TemporaryDirectory(dir=local_path.parent) as tmp:
            got = Path(self.repo.download_artifacts(remote_path, tmp))
            shutil.move(str(got), local_path)
        return getattr(file_digest(local_path), checksum)

    def _download_direct(self, remote_path: str, local_path: Path, checksum: str) -> str:
        from requests import HTTPError

        try:
            presigned = self.repo._get_presigned_download_url(remote_path)  # the server looks for the object
        except HTTPError as exc:
            if exc.response is not None:
                _raise_if_missing(exc.response, remote_path)
            raise
        size = presigned.file_size
        if size is None:
            raise DirectTransferError("the server did not say how large the file is")
        ranges = part_ranges(size, self.part_size)
        fd = os.open(local_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)

            def get(span: tuple[int, int]) -> int:
                """Writes one range in place; returns the CRC-32 of its bytes."""
                offset, length = span
                crc = 0
                if length == 0:
                    return crc
                headers = {**(presigned.headers or {}), "Range": f"bytes={offset}-{offset + length - 1}"}
                with self._session().get(presigned.url, headers=headers, stream=True, timeout=TIMEOUT) as resp:
                    _raise_if_missing(resp, remote_path)  # deleted since the server found it
                    if resp.status_code not in (200, 206):
                        raise DirectTransferError(f"bytes {offset}+{length}: HTTP {resp.status_code}")
                    if resp.status_code == 200 and length != size:
                        raise DirectTransferError("the S3 server ignored the Range header")
                    at = offset
                    for block in resp.raw.stream(READ_SIZE, decode_content=False):
                        os.pwrite(fd, block, at)
                        if checksum == "crc32":
                            crc = zlib.crc32(block, crc)
                        at += len(block)
                    if at != offset + length:
                        raise DirectTransferError(f"bytes {offset}+{length}: got {at - offset}")
                return crc

            # Ranges finish in any order; map() hands them back in file order, so each one joins
            # the file's checksum while the ones after it are still downloading: a CRC-32 from
            # the range's own, a sha256 (which has no such joining) by reading it back from the
            # page cache.
            crc, digest = 0, new_checksum(checksum)
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="range-download") as pool:
                for (offset, length), range_crc in zip(ranges, pool.map(get, ranges)):
                    if checksum == "crc32":
                        crc = crc32_combine(crc, range_crc, length)
                        continue
                    for at in range(offset, offset + length, READ_SIZE):
                        digest.update(os.pread(fd, min(READ_SIZE, offset + length - at), at))
        except BaseException:
            os.close(fd)
            local_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return crc32_hex(crc) if checksum == "crc32" else digest.hexdigest()

    def list_artifacts(self, path: str | None = None):
        return self.repo.list_artifacts(path)

    def read_bytes(self, remote_path: str) -> bytes:
        """A small file (a manifest) into memory: one request, no temporary file."""
        if not self._http:
            with tempfile.TemporaryDirectory() as tmp:
                return Path(self.repo.download_artifacts(remote_path, tmp)).read_bytes()
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        resp = http_request(self.repo._host_creds, posixpath.join("/", remote_path), "GET")
        _raise_if_missing(resp, remote_path)
        augmented_raise_for_status(resp)
        return resp.content

    # -- delete ----------------------------------------------------------------------------------

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        self.repo.delete_artifacts(artifact_path)
