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
are MLflow's own: only the endpoint function of the GET route is replaced. A key with no object
is answered at once (404, or 400 for a folder) where MLflow answers 500; anything else that is not
a plain object in S3 (another store, an S3 error) falls back to MLflow's code.

Large files can also skip the relay: MLflow's clients ask ``/server-info`` whether the server
hands out presigned S3 URLs (multipart upload, ranged download) and then move the bytes to and
from S3 directly, in parallel, the server only checking who may do it. Those URLs must name an
S3 endpoint the *clients* reach, which in compose is not the ``http://s3:9000`` the server uses:
``S3_PUBLIC_ENDPOINT_URL`` names it, and without it the server says it has no presigned
transfers, so every byte goes through the proxy instead of to a host clients cannot resolve.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import posixpath
from types import SimpleNamespace

logger = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # multipart part size of streamed uploads (S3 minimum: 5 MiB)
PARTS_IN_FLIGHT = 3  # parts uploading at once per upload: memory is at most (this + 1) parts
DOWNLOAD_ROUTE_SUFFIX = "/mlflow-artifacts/artifacts/{artifact_path:path}"


def create_app():
    from mlflow.server.auth import create_app as create_auth_app

    from mlstack.login_limiter import install_login_limiter
    from mlstack.request_limits import limit_requests
    from mlstack.user_admin_guard import install_user_directory_guard

    install_streaming_upload()
    install_presigned_transfers(os.environ.get("S3_PUBLIC_ENDPOINT_URL", ""))
    install_light_run_lookup()
    install_user_directory_guard()
    app = create_auth_app()
    install_login_limiter(app)
    install_streaming_download(app)
    limit_requests(app)  # last added runs first: sizes and paths are checked before anything else
    return app


# -- permission checks ----------------------------------------------------------------------------------


def install_light_run_lookup() -> None:
    """Let the auth checks look up a run's experiment with one narrow query.

    To authorize a write to a run (log_batch, set_tag...), MLflow's auth app loads the whole run
    (every param, tag and latest metric) only to read its experiment id. A training run logs a
    few hundred params, and that load was 65% of the server's CPU per log_batch (py-spy, bench/):
    35 ms of CPU per metrics request. The view below answers ``get_run`` for the auth module
    only, with the store's own run query (workspaces and "not found" errors included) and no
    eager loading; every other call goes to the real store, and the handlers are untouched.
    """
    from mlflow.server import auth
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    real = auth._get_tracking_store
    if getattr(real, "_light_run_lookup", False):
        return

    def tracking_store():
        store = real()
        return _RunExperimentView(store) if isinstance(store, SqlAlchemyStore) else store

    tracking_store._light_run_lookup = True
    auth._get_tracking_store = tracking_store


class _RunExperimentView:
    def __init__(self, store):
        self._store = store

    def get_run(self, run_id: str):
        with self._store.ManagedSessionMaker() as session:
            run = self._store._get_run(run_uuid=run_id, session=session, eager=False)
            return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=str(run.experiment_id)))

    def __getattr__(self, name):
        return getattr(self._store, name)


# -- presigned (direct) transfers ---------------------------------------------------------------------

DISABLED_VALUES = ("", "off", "none", "false")


def install_presigned_transfers(public_endpoint: str) -> bool:
    """Presign S3 URLs on ``public_endpoint``, or switch presigned transfers off; True when on."""
    from mlflow.server import handlers
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if public_endpoint.strip().lower() in DISABLED_VALUES:
        # The server-info answer and the mpu/presigned handlers all ask isinstance(repo, <mixin>);
        # a mixin nobody implements makes them answer "unsupported", which clients handle by
        # falling back to the proxied endpoints.
        class _NoPresignedTransfers(abc.ABC):
            pass

        for name in ("MultipartUploadMixin", "MultipartDownloadMixin", "PresignedUploadMixin"):
            setattr(handlers, name, _NoPresignedTransfers)
        return False
    original = S3ArtifactRepository._get_s3_client
    if getattr(original, "_presigns_on", None) == public_endpoint:
        return True

    def get_s3_client(self):
        from mlflow.store.artifact.s3_artifact_repo import _get_s3_client

        public = _get_s3_client(access_key_id=self._access_key_id, secret_access_key=self._secret_access_key,
                                session_token=self._session_token, s3_endpoint_url=public_endpoint)
        return PublicPresigning(original(self), public)

    get_s3_client._presigns_on = public_endpoint
    S3ArtifactRepository._get_s3_client = get_s3_client
    return True


class PublicPresigning:
    """An S3 client that makes its calls on the server's endpoint and presigns on the public one.

    Presigning is local (no request is made), and a SigV4 signature covers the Host header, so a
    URL must be signed for the very host the client will send it to: rewriting the host of a URL
    signed for ``s3:9000`` would break it.
    """

    def __init__(self, client, public_client):
        self._client, self._public = client, public_client

    def generate_presigned_url(self, *args, **kwargs):
        return self._public.generate_presigned_url(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


# -- download ---------------------------------------------------------------------------------------


def install_streaming_download(app) -> int:
    """Replace the endpoint of MLflow's GET artifact routes; returns how many were replaced."""
    from fastapi.routing import APIRoute

    replaced = 0
    for router, i, route in _routes_of(app.router):
        if isinstance(route, APIRoute) and route.path.endswith(DOWNLOAD_ROUTE_SUFFIX) and route.methods == {"GET"}:
            if getattr(route.endpoint, "_streams", False):
                replaced += 1  # already ours (create_app called twice in one process)
                continue
            router.routes[i] = APIRoute(route.path, _streaming_download(route.endpoint), methods=["GET"],
                                        name=route.name)
            getattr(router, "_mark_routes_changed", lambda: None)()  # FastAPI caches an included router's routes
            replaced += 1
    if not replaced:
        logger.warning("MLflow's artifact download route was not found: downloads use MLflow's temp-file path")
    return replaced


def _routes_of(router):
    """(router, index, route) of every route, those of included routers too.

    FastAPI 0.13x+ keeps an included router whole (an ``_IncludedRouter`` holding
    ``original_router``) instead of copying its routes into the app's list, which is where
    MLflow's artifact routes live; a search of the app's own list found nothing, and downloads
    silently went through MLflow's temporary file.
    """
    for i, route in enumerate(router.routes):
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes_of(included)
        else:
            yield router, i, route


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
        key = posixpath.join(prefix, path)
        try:
            obj = await asyncio.to_thread(client.get_object, Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in NO_SUCH_KEY_CODES:
                return await original(artifact_path)  # access denied, throttled...: MLflow's answer
            return await asyncio.to_thread(_no_object_answer, client, bucket, key, artifact_path)
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

    download_artifact._streams = True
    return download_artifact


NO_SUCH_KEY_CODES = ("NoSuchKey", "404")  # GET answers NoSuchKey; botocore reports a bodiless answer by its status


def _no_object_answer(client, bucket: str, key: str, artifact_path: str):
    """The answer to a GET of a key that holds no object: 400 for a folder, 404 for nothing at all.

    MLflow's own handler answers 500 to both with an S3 store (it copies a folder to a temporary
    directory and fails to open that as a file; a missing key ends in INTERNAL_ERROR), and its
    clients retry a 500 seven times with growing pauses: a checkpoint with one object gone kept a
    resume waiting about 4 minutes. A missing object is not going to appear by retrying. The
    folder answer is the one MLflow gives for a folder in a local store.
    """
    from fastapi.responses import JSONResponse
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    listed = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    if listed.get("KeyCount", 0):
        error = MlflowException(f"Artifact path refers to a directory, not a file: '{artifact_path}'",
                                error_code=INVALID_PARAMETER_VALUE)
    else:
        error = MlflowException(f"No artifact at '{artifact_path}': no such object in the artifact store",
                                error_code=RESOURCE_DOES_NOT_EXIST)
    return JSONResponse(status_code=error.get_http_status_code(), content=json.loads(error.serialize_as_json()))


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
