"""Artifact uploads go to S3 as a multipart upload while the body is being received.

MLflow 3.17's proxied upload endpoint, with an S3 store, first writes the whole body to the
server's disk, then uploads it with boto3. Its upload route already looks for a streaming hook
(``StreamUploadMixin``) that its S3 repository does not implement; this module implements it, so
memory per upload stays bounded (a few parts) and no temporary file is written.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath

from mlstack.patches.app_routes import ARTIFACT_ROUTES, asks_for, endpoints, qualname
from mlstack.patches.self_check import Patch

logger = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # multipart part size of streamed uploads (S3 minimum: 5 MiB)
PARTS_IN_FLIGHT = 3  # parts uploading at once per upload: memory is at most (this + 1) parts


def install_streaming_upload() -> None:
    """Give MLflow's S3 repository the streaming-upload hook its upload route already looks for."""
    from mlflow.store.artifact.artifact_repo import StreamUploadMixin
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if issubclass(S3ArtifactRepository, StreamUploadMixin):
        return  # MLflow implements it itself (a newer version)
    S3ArtifactRepository.log_artifact_from_async_stream = _log_artifact_from_async_stream
    S3ArtifactRepository.log_artifact_from_stream = _log_artifact_from_stream
    StreamUploadMixin.register(S3ArtifactRepository)


def check_streaming_upload(app) -> str | None:
    """MLflow's S3 repository has the hook, and every PUT artifact route still asks for it: an
    upload route that stopped asking would write each body to a temporary file again."""
    from mlflow.store.artifact.artifact_repo import StreamUploadMixin
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if not issubclass(S3ArtifactRepository, StreamUploadMixin):
        return "MLflow's S3ArtifactRepository does not implement StreamUploadMixin"
    for path in ARTIFACT_ROUTES:
        found = endpoints(app, "PUT", path)
        if not found:
            return f"no PUT route {path} found in MLflow's app"
        if deaf := [f for f in found if not asks_for(f, "StreamUploadMixin", StreamUploadMixin)]:
            return f"PUT {path} ({qualname(deaf[0])}) no longer asks whether the repository is a StreamUploadMixin"
    return None


PATCH = Patch(
    name="streaming_upload",
    without_it="every artifact upload is first written whole to a temporary file on the server, then sent to S3",
    install=install_streaming_upload,
    check=check_streaming_upload,
)


def _target(repo, artifact_file_name: str, artifact_path: str | None) -> tuple[str, str, dict]:
    from mlflow.utils.mime_type_utils import _guess_mime_type

    bucket, key = repo.parse_s3_compliant_uri(repo.artifact_uri)
    if artifact_path:
        key = posixpath.join(key, artifact_path)
    name = posixpath.basename(artifact_file_name)
    extra = {"ContentType": _guess_mime_type(name), **repo._bucket_owner_params}
    return bucket, posixpath.join(key, name), extra


def relay_client(repo):
    """MLflow's S3 client for ``repo``, set to send bodies as UNSIGNED-PAYLOAD.

    Over plain HTTP botocore signs every body: a SHA-256 of each 8 MiB part, on the server's
    CPU, for every byte a client uploads through it (0.8 CPU-s per GB measured, a sixth of the
    relay's CPU). The request itself stays signed, and botocore still sends each body's CRC-32
    (``x-amz-checksum-crc32``, a signed header) for S3 to check, so a part altered or cut short
    is refused as before. The setting is on MLflow's cached client, so the server's other S3
    calls through it (downloads, copies) send unsigned bodies too (they send none, or small
    ones). MLflow makes a new client per endpoint and keys, and again every few hours: each one
    is set on its first relayed upload.
    """
    client = repo._get_s3_client()
    s3_config = client.meta.config.s3 or {}
    if s3_config.get("payload_signing_enabled") is not False:
        client.meta.config.s3 = {**s3_config, "payload_signing_enabled": False}
    return client


async def _log_artifact_from_async_stream(self, chunks, artifact_file_name, artifact_path=None) -> None:
    bucket, key, extra = _target(self, artifact_file_name, artifact_path)
    client = relay_client(self)
    upload_id = None
    in_flight: list[asyncio.Task] = []
    parts: list[dict] = []
    numbers = iter(range(1, 10_001))  # S3 part numbers
    # The body is copied once, from each received chunk into a part buffer, and the buffers are
    # used again once their part is stored. A bytearray goes to the socket in one send and its
    # CRC-32 is taken in place; bytes would be wrapped in a file object that botocore reads back
    # 128 KiB at a time, a copy per read, and a new 8 MiB bytes object per part costs its page
    # faults (bench/README.md, ninth round: the relay's CPU per GB).
    spare: list[bytearray] = []
    part, filled = bytearray(PART_SIZE), 0

    async def send(data: bytearray, number: int) -> None:
        try:
            resp = await asyncio.to_thread(client.upload_part, Bucket=bucket, Key=key, UploadId=upload_id,
                                           PartNumber=number, Body=data)
        finally:
            spare.append(data)  # stored or failed: either way no longer read
        parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    try:
        async for chunk in chunks:
            view = memoryview(chunk)
            while view:
                taken = min(len(view), PART_SIZE - filled)
                part[filled:filled + taken] = view[:taken]
                filled, view = filled + taken, view[taken:]
                if filled < PART_SIZE:
                    continue
                if upload_id is None:
                    upload_id = (await asyncio.to_thread(client.create_multipart_upload, Bucket=bucket, Key=key,
                                                         **extra))["UploadId"]
                in_flight.append(asyncio.create_task(send(part, next(numbers))))
                if len([t for t in in_flight if not t.done()]) >= PARTS_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for t in [t for t in in_flight if t.done()]:
                    t.result()
                    in_flight.remove(t)
                part, filled = (spare.pop() if spare else bytearray(PART_SIZE)), 0
        if upload_id is None:  # smaller than one part: a plain PUT
            await asyncio.to_thread(client.put_object, Bucket=bucket, Key=key, Body=part[:filled], **extra)
            return
        if filled:
            in_flight.append(asyncio.create_task(send(part[:filled], next(numbers))))
        await asyncio.gather(*in_flight)
        await asyncio.to_thread(client.complete_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id,
                                MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])})
    except BaseException:
        for t in in_flight:
            t.cancel()
        if upload_id is not None:
            try:
                await asyncio.to_thread(client.abort_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original error matters more
                logger.exception("could not abort the multipart upload of %s", key)
        raise


def _log_artifact_from_stream(self, stream, artifact_file_name, artifact_path=None) -> None:
    bucket, key, extra = _target(self, artifact_file_name, artifact_path)
    relay_client(self).upload_fileobj(stream, bucket, key, ExtraArgs=extra)
