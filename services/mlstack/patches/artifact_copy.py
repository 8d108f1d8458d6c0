"""Server-side copies inside one run's artifacts: a file the trainer already stored is not sent again.

Every checkpoint folder in the store is whole (config.json and tokenizer files included), so that a
folder downloaded from the UI loads with ``from_pretrained`` on its own. Most of those files do
not change between saves; sending them again costs the trainer's uplink, so the trainer asks the
server to copy the stored object instead (S3 CopyObject, or UploadPartCopy above boto3's
multipart threshold): the bytes move inside S3.

The request is MLflow's own proxied upload, ``PUT .../mlflow-artifacts/artifacts/<destination>``,
with no body and a header naming the source::

    X-Mlstack-Copy-From: checkpoints/step-00000008/config.json

so MLflow's auth checks it exactly like an upload to ``<destination>`` (UPDATE on the destination's
experiment, by its own path parsing; no new route for the permission table to miss). Reading the
source needs no second check only because the source must lie in the *same run*: it is resolved
relative to the destination's run root (``<experiment>/<run>/artifacts/``), and a user who may
write a run may read it. The source path goes through MLflow's ``validate_path_is_safe`` (no
``..``, no absolute path, no encoded tricks), so it cannot leave that run. A destination that is
not inside a run's artifacts is refused (400), and so is a copy onto itself.

Why not a presigned copy: S3 can presign a CopyObject (the ``x-amz-copy-source`` header is
signed with it), but a copy moves no bytes through the client, so a direct URL saves nothing,
and the server would still need a new route to decide which source to sign, outside MLflow's
auth table. Done here, the one request is checked by MLflow's own rule for uploads.

The answer carries ``X-Mlstack-Copied: 1``. A server without this patch would store the empty
body instead: the trainer sees the header missing and uploads the file's bytes over it (see
mltrainer.transfer), so an older server costs bandwidth, never a wrong file.
"""

from __future__ import annotations

import asyncio
import json
import posixpath

from mlstack.patches.app_routes import ARTIFACT_ROUTES, endpoints, qualname, routes_of
from mlstack.patches.self_check import Patch

COPY_FROM_HEADER = "X-Mlstack-Copy-From"
COPIED_HEADER = "X-Mlstack-Copied"
RUN_ROOT_SEGMENTS = 3  # <experiment id>/<run id>/artifacts: how MLflow lays out a run's artifact URI


class CopyRefused(ValueError):
    """The copy asked for is not one this server makes; the message says why (answered 400)."""


def run_root_of(destination: str) -> str:
    """``<experiment>/<run>/artifacts`` of a destination path inside a run's artifacts."""
    parts = destination.split("/")
    if len(parts) <= RUN_ROOT_SEGMENTS or parts[2] != "artifacts" or not all(parts[:RUN_ROOT_SEGMENTS]):
        raise CopyRefused(f"copy destination {destination!r} is not a file inside a run's artifacts "
                          "(<experiment>/<run>/artifacts/<path>)")
    return "/".join(parts[:RUN_ROOT_SEGMENTS])


def copy_source(destination: str, source: str) -> str:
    """The full artifact path of ``source`` (relative to the destination's run root), checked.

    Raises:
        CopyRefused: the source is unsafe (MLflow's path check), empty, or the destination itself.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.uri import validate_path_is_safe

    root = run_root_of(destination)
    if not source or source.startswith("/") or source.endswith("/"):
        raise CopyRefused(f"copy source {source!r} must name a file relative to the run's artifact root")
    try:
        source = validate_path_is_safe(source)
    except MlflowException as exc:
        raise CopyRefused(f"copy source {source!r} refused: {exc.message}") from None
    if any(part in ("", ".", "..") for part in source.split("/")):
        raise CopyRefused(f"copy source {source!r} refused: it must stay inside the run")
    full = f"{root}/{source}"
    if full == destination:
        raise CopyRefused(f"copy source and destination are the same object: {source!r}")
    return full


def install_artifact_copy(app) -> int:
    """Wrap the endpoint of MLflow's PUT artifact routes; returns how many were wrapped."""
    from fastapi.routing import APIRoute

    wrapped = 0
    for router, i, route in routes_of(app.router):
        if isinstance(route, APIRoute) and route.path in ARTIFACT_ROUTES and route.methods == {"PUT"}:
            if getattr(route.endpoint, "_copies", False):
                wrapped += 1
                continue
            router.routes[i] = APIRoute(route.path, _copying_upload(route.endpoint), methods=["PUT"],
                                        name=route.name)
            getattr(router, "_mark_routes_changed", lambda: None)()  # FastAPI caches an included router's routes
            wrapped += 1
    return wrapped


def check_artifact_copy(app) -> str | None:
    for path in ARTIFACT_ROUTES:
        found = endpoints(app, "PUT", path)
        if not found:
            return f"no PUT route {path} found in MLflow's app"
        if theirs := [f for f in found if not getattr(f, "_copies", False)]:
            return f"PUT {path} is served by {qualname(theirs[0])}, which makes no server-side copies"
    return None


PATCH = Patch(
    name="artifact_copy",
    without_it="trainers send every unchanged checkpoint file again instead of having the server copy it",
    install=install_artifact_copy,
    check=check_artifact_copy,
)


def _answer(status: int, message: str, code: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error_code": code, "message": message})


def _copying_upload(original):
    async def upload_artifact(artifact_path: str, request):
        source = request.headers.get(COPY_FROM_HEADER)
        if source is None:
            return await original(artifact_path, request)
        return await _copy(artifact_path, source)

    # MLflow's endpoint stays reachable as __wrapped__: FastAPI reads its signature for the
    # parameters (artifact_path, request), and the streaming_upload patch's check still sees
    # that the upload path asks for the streaming hook.
    upload_artifact.__wrapped__ = original
    upload_artifact._copies = True
    return upload_artifact


async def _copy(artifact_path: str, source: str):
    from botocore.exceptions import ClientError
    from fastapi.responses import Response
    from mlflow.exceptions import MlflowException
    from mlflow.server import artifact_router as ar
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository
    from mlflow.utils.uri import validate_path_is_safe

    if not ar._is_serving_proxied_artifacts():
        return _answer(503, "artifact serving is disabled", "TEMPORARILY_UNAVAILABLE")
    try:
        destination = validate_path_is_safe(artifact_path)
        full_source = copy_source(destination, source)
    except CopyRefused as exc:
        return _answer(400, str(exc), "INVALID_PARAMETER_VALUE")
    except MlflowException as exc:
        return _answer(400, exc.message, "INVALID_PARAMETER_VALUE")
    repo = ar._get_artifact_repo()
    if not isinstance(repo, S3ArtifactRepository):
        return _answer(501, "server-side copies need an S3 artifact store", "NOT_IMPLEMENTED")
    bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
    src_key = posixpath.join(prefix, ar._get_workspace_scoped_path(full_source))
    dst_key = posixpath.join(prefix, ar._get_workspace_scoped_path(destination))
    client = repo._get_s3_client()
    try:
        # boto3's managed copy: CopyObject, or UploadPartCopy parts past its multipart threshold
        # (CopyObject stops at 5 GB). The bytes never leave S3.
        await asyncio.to_thread(client.copy, {"Bucket": bucket, "Key": src_key}, bucket, dst_key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return _answer(404, f"copy source not found: {source}", "RESOURCE_DOES_NOT_EXIST")
        raise
    return Response(status_code=200, headers={COPIED_HEADER: "1"},
                    content=json.dumps({"copied_from": source}), media_type="application/json")
