"""The ASGI app gunicorn serves: MLflow's FastAPI app with basic auth, plus streaming artifact I/O.

MLflow 3.17's proxied artifact endpoints go through a temporary file on the server when the store
is S3 (measured with bench/bench.py, 1 GB checkpoint, 2 cores):

* download: the whole object is first copied from S3 to the server's disk, then sent; the client
  waits for both, one after the other;
* upload: the whole body is first written to the server's disk, then uploaded with boto3.

Here both stream: a download sends the S3 object's body as it arrives (``get_object``), an
upload goes to S3 as a multipart upload while it is being received (MLflow's own hook for this,
``StreamUploadMixin``, which its S3 repository does not implement). Memory per transfer stays
bounded (a few parts), no temporary file is written, and the routes, auth and permission checks
are MLflow's own: only the endpoint function of the GET route is replaced, and anything that is
not a plain object in S3 (a directory, a missing key, another store) falls back to MLflow's code.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath

logger = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # multipart part size of streamed uploads (S3 minimum: 5 MiB)
PARTS_IN_FLIGHT = 3  # parts uploading at once per upload: memory is at most (this + 1) parts
DOWNLOAD_ROUTE_SUFFIX = "/mlflow-artifacts/artifacts/{artifact_path:path}"


def create_app():
    from mlflow.server.auth import create_app as create_auth_app

    install_streaming_upload()
    app = create_auth_app()
    install_streaming_download(app)
    return app


# -- download ---------------------------------------------------------------------------------------


def install_streaming_download(app) -> int:
    """Replace the endpoint of MLflow's GET artifact routes; returns how many were replaced."""
    from fastapi.routing import APIRoute

    replaced = 0
    for i, route in enumerate(app.router.routes):
        if isinstance(route, APIRoute) and route.path.endswith(DOWNLOAD_ROUTE_SUFFIX) and route.methods == {"GET"}:
            app.router.routes[i] = APIRoute(route.path, _streaming_download(route.endpoint), methods=["GET"],
                                            name=route.name)
            replaced += 1
    if not replaced:
        logger.warning("MLflow's artifact download route was not found: downloads use MLflow's temp-file path")
    return replaced


def _streaming_download(original):
    async def download_artifact(artifact_path: str):
        from botocore.exceptions import ClientError
        from fastapi.responses import StreamingResponse
        from mlflow.server import artifact_router as ar
        from mlflow.store.artifact.artifact_repo import ARTIFACT_STREAM_CHUNK_SIZE
        from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository
        from mlflow.utils.uri import validate_path_is_safe

        try:
            if not ar._is_serving_proxied_artifacts():
                return await original(artifact_path)
            path = ar._get_workspace_scoped_path(validate_path_is_safe(artifact_path))
            repo = ar._get_artifact_repo()
        except Exception:  # noqa: BLE001 - MLflow's handler produces the proper error response
            return await original(artifact_path)
        if not isinstance(repo, S3ArtifactRepository):
            return await original(artifact_path)
        bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
        client = repo._get_s3_client()
        try:
            obj = await asyncio.to_thread(client.get_object, Bucket=bucket, Key=posixpath.join(prefix, path))
        except ClientError:
            return await original(artifact_path)  # not found, a directory...: MLflow's answer
        body = obj["Body"]

        def chunks():  # sync: Starlette iterates it in its thread pool, one chunk per send
            try:
                yield from body.iter_chunks(ARTIFACT_STREAM_CHUNK_SIZE)
            finally:
                body.close()

        return StreamingResponse(chunks(), headers={
            "Content-Type": ar._guess_mime_type(path),
            "Content-Disposition": ar._content_disposition(posixpath.basename(path)),
            "Content-Length": str(obj["ContentLength"]),
            "X-Content-Type-Options": "nosniff",
        })

    return download_artifact


# -- upload -----------------------------------------------------------------------------------------


def install_streaming_upload() -> None:
    """Give MLflow's S3 repository the streaming-upload hook its upload route already looks for."""
    from mlflow.store.artifact.artifact_repo import StreamUploadMixin
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if issubclass(S3ArtifactRepository, StreamUploadMixin):
        return  # MLflow implements it itself (a newer version)
    S3ArtifactRepository.log_artifact_from_async_stream = _log_artifact_from_async_stream
    S3ArtifactRepository.log_artifact_from_stream = _log_artifact_from_stream
    StreamUploadMixin.register(S3ArtifactRepository)


def _target(repo, artifact_file_name: str, artifact_path: str | None) -> tuple[str, str, dict]:
    from mlflow.utils.mime_type_utils import _guess_mime_type

    bucket, key = repo.parse_s3_compliant_uri(repo.artifact_uri)
    if artifact_path:
        key = posixpath.join(key, artifact_path)
    name = posixpath.basename(artifact_file_name)
    extra = {"ContentType": _guess_mime_type(name), **repo._bucket_owner_params}
    return bucket, posixpath.join(key, name), extra


async def _log_artifact_from_async_stream(self, chunks, artifact_file_name, artifact_path=None) -> None:
    bucket, key, extra = _target(self, artifact_file_name, artifact_path)
    client = self._get_s3_client()
    buf = bytearray()
    upload_id = None
    in_flight: list[asyncio.Task] = []
    parts: list[dict] = []
    numbers = iter(range(1, 10_001))  # S3 part numbers

    async def send(data: bytes, number: int) -> None:
        resp = await asyncio.to_thread(client.upload_part, Bucket=bucket, Key=key, UploadId=upload_id,
                                       PartNumber=number, Body=data)
        parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    try:
        async for chunk in chunks:
            buf += chunk
            while len(buf) >= PART_SIZE:
                if upload_id is None:
                    upload_id = (await asyncio.to_thread(client.create_multipart_upload, Bucket=bucket, Key=key,
                                                         **extra))["UploadId"]
                data, buf = bytes(buf[:PART_SIZE]), buf[PART_SIZE:]
                in_flight.append(asyncio.create_task(send(data, next(numbers))))
                if len([t for t in in_flight if not t.done()]) >= PARTS_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for t in [t for t in in_flight if t.done()]:
                    t.result()
                    in_flight.remove(t)
        if upload_id is None:  # smaller than one part: a plain PUT
            await asyncio.to_thread(client.put_object, Bucket=bucket, Key=key, Body=bytes(buf), **extra)
            return
        if buf:
            in_flight.append(asyncio.create_task(send(bytes(buf), next(numbers))))
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
    self._get_s3_client().upload_fileobj(stream, bucket, key, ExtraArgs=extra)
