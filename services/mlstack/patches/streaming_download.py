"""Artifact downloads stream from S3 instead of going through a temporary file on the server.

MLflow 3.17's proxied download endpoint, with an S3 store, first copies the whole object from S3
to the server's disk, then sends it; the client waits for both, one after the other (measured
with bench/bench.py, 1 GB checkpoint, 2 cores). Here the S3 object's body is sent as it arrives
(``get_object``): memory stays bounded and no temporary file is written. The routes, auth and
permission checks are MLflow's own: only the endpoint function of the GET route is replaced. A
key with no object is answered at once (404, or 400 for a folder) where MLflow answers 500;
anything else that is not a plain object in S3 (another store, an S3 error) falls back to
MLflow's code.
"""

from __future__ import annotations

import asyncio
import json
import posixpath

from mlstack.patches.app_routes import ARTIFACT_ROUTES, endpoints, qualname, routes_of
from mlstack.patches.self_check import Patch


def install_streaming_download(app) -> int:
    """Replace the endpoint of MLflow's GET artifact routes; returns how many were replaced.
    Whether that was all of them is ``check_streaming_download``'s to say."""
    from fastapi.routing import APIRoute

    replaced = 0
    for router, i, route in routes_of(app.router):
        if isinstance(route, APIRoute) and route.path in ARTIFACT_ROUTES and route.methods == {"GET"}:
            if getattr(route.endpoint, "_streams", False):
                replaced += 1  # already ours (create_app called twice in one process)
                continue
            router.routes[i] = APIRoute(route.path, _streaming_download(route.endpoint), methods=["GET"],
                                        name=route.name)
            getattr(router, "_mark_routes_changed", lambda: None)()  # FastAPI caches an included router's routes
            replaced += 1
    return replaced


def check_streaming_download(app) -> str | None:
    """Every GET artifact route of the app is served by our endpoint."""
    for path in ARTIFACT_ROUTES:
        found = endpoints(app, "GET", path)
        if not found:
            return f"no GET route {path} found in MLflow's app"
        if theirs := [f for f in found if not getattr(f, "_streams", False)]:
            return f"GET {path} is still served by {qualname(theirs[0])}"
    return None


PATCH = Patch(
    name="streaming_download",
    without_it="every artifact download is first copied whole from S3 to a temporary file on the server",
    install=install_streaming_download,
    check=check_streaming_download,
)


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
