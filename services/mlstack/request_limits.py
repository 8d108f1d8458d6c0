"""Refuse, before MLflow sees them, requests whose size or artifact path MLflow cannot handle.

Probed on MLflow 3.17 under its FastAPI app, each of these ended in a 500 or in unbounded memory:

* Bodies: MLflow's Flask API sits behind a WSGI bridge that reads the whole body into memory
  before any handler runs, then parses it whole. A ``set-tag`` with a 100 MB value was accepted
  (the value silently cut to 8000 characters) and grew a worker by 495 MiB, where MLflow's own
  field limits put the largest honest ``set-tag`` under 100 KB. Each route gets a bound derived
  from those limits (``BODY_BOUNDS``; ``DEFAULT_BODY_BOUND`` for the rest); a body over it is
  refused with 413 after reading at most the bound, whatever Content-Length says (or doesn't,
  for a chunked body). Artifact uploads are exempt: checkpoint files of gigabytes stream to S3.
* NUL characters: PostgreSQL text cannot hold U+0000, so a run name, tag, experiment name or
  lookup with one in it failed inside the database (500 "A string literal cannot contain NUL").
* Artifact paths with a backslash, ``%00`` or another control character, bytes that are not
  UTF-8, empty or dot segments, or more bytes than an S3 key (or a folder name) may hold: stored
  under a key no client lists the same way, or a 500 from S3 (``KeyTooLongError``).

Every refusal is MLflow's own error format (``{"error_code": ..., "message": ...}``) with a
message naming what is wrong, so MLflow's clients show it as they show MLflow's errors.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import parse_qsl, unquote_to_bytes

from mlflow.utils import validation as mlflow_limits

from mlstack.patches.self_check import Patch

KiB, MiB = 1024, 1024 * 1024

# -- body bounds --------------------------------------------------------------------------------------

# MLflow counts a limit in characters of a Python str; in the JSON its Python client sends
# (ensure_ascii) a character takes up to 12 bytes: "\ud83d\ude00" for one emoji.
JSON_BYTES_PER_CHAR = 12
# What a call carries beside the fields MLflow limits: ids, numbers, field names, punctuation.
ENVELOPE = 16 * KiB


def _chars(n: int) -> int:
    return n * JSON_BYTES_PER_CHAR


# One entry of each kind, at its limits; 64 bytes for its field names and punctuation, a metric's
# value, timestamp, step and model id in 512.
_TAG = _chars(mlflow_limits.MAX_ENTITY_KEY_LENGTH + mlflow_limits.MAX_TAG_VAL_LENGTH) + 64
_PARAM = _chars(mlflow_limits.MAX_ENTITY_KEY_LENGTH + mlflow_limits.MAX_PARAM_VAL_LENGTH) + 64
_METRIC = _chars(mlflow_limits.MAX_ENTITY_KEY_LENGTH + mlflow_limits.MAX_DATASET_NAME_SIZE
                 + mlflow_limits.MAX_DATASET_DIGEST_SIZE) + 512

# Route (after /api/2.0/mlflow/ or /ajax-api/2.0/mlflow/) -> the largest body MLflow's limits allow.
BODY_BOUNDS = {
    "runs/set-tag": _TAG + ENVELOPE,
    "runs/delete-tag": _chars(mlflow_limits.MAX_ENTITY_KEY_LENGTH) + ENVELOPE,
    "runs/log-parameter": _PARAM + ENVELOPE,
    "runs/log-metric": _METRIC + ENVELOPE,
    # At most 100 params, 100 tags and 1000 entries in all: the largest batch has the 100 tags
    # and 100 params (the larger entries) and 800 metrics.
    "runs/log-batch": mlflow_limits.MAX_PARAMS_TAGS_PER_BATCH * (_TAG + _PARAM)
    + (mlflow_limits.MAX_ENTITIES_PER_BATCH - 2 * mlflow_limits.MAX_PARAMS_TAGS_PER_BATCH) * _METRIC + ENVELOPE,
    "experiments/set-experiment-tag": _chars(mlflow_limits.MAX_EXPERIMENT_TAG_KEY_LENGTH
                                             + mlflow_limits.MAX_EXPERIMENT_TAG_VAL_LENGTH) + ENVELOPE,
    "upload-artifact": 10 * MiB + ENVELOPE,  # the UI's upload; MLflow's handler refuses over 10 MiB
}
# Any other request. The largest single field MLflow accepts is a dataset's profile (16 MiB, in
# log-inputs) beside its schema (1 MiB) and source (64 KiB); twice that leaves room for JSON
# escaping of the quotes they are made of.
DEFAULT_BODY_BOUND = 2 * (mlflow_limits.MAX_DATASET_PROFILE_SIZE + mlflow_limits.MAX_DATASET_SCHEMA_SIZE
                          + mlflow_limits.MAX_DATASET_SOURCE_SIZE) + ENVELOPE

_API_ROUTE = re.compile(r"/(?:ajax-)?api/2\.0/mlflow/(?P<route>.+?)/?$")
# Uploads stream through to S3 (mlstack.patches.streaming_upload): never buffered, never bounded.
_ARTIFACT_UPLOAD = re.compile(r"/(?:ajax-)?api/2\.0/mlflow-artifacts/artifacts/")


def body_bound(method: str, path: str) -> int | None:
    """The most bytes a request's body may have; None for an artifact upload."""
    if method == "PUT" and _ARTIFACT_UPLOAD.search(path):
        return None
    match = _API_ROUTE.search(path)
    return BODY_BOUNDS.get(match["route"], DEFAULT_BODY_BOUND) if match else DEFAULT_BODY_BOUND


# -- artifact paths -----------------------------------------------------------------------------------

S3_MAX_KEY_BYTES = 1024  # S3's limit on a key
MAX_NAME_BYTES = 255  # a folder or file name: SeaweedFS's filer, and the disks checkpoints are restored to
# Ahead of a run-relative path in the key: "<experiment id>/<run id>/artifacts/" (up to 63 bytes),
# or a logged model's "<experiment id>/models/<model id>/artifacts/".
RUN_ROOT_BYTES = 64

# Artifact routes that carry the path in the URL, after this prefix.
_PATH_IN_URL = re.compile(rb"^/(?:ajax-)?api/2\.0/mlflow-artifacts/(?:artifacts|presigned|mpu/(?:create|complete|abort))/")
# Query parameters that name an artifact path (listing, deleting, get-artifact, logged models).
PATH_PARAMETERS = ("path", "artifact_file_path", "artifact_directory_path")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def max_artifact_path_bytes(destination: str | None = None) -> int:
    """The longest artifact path (in UTF-8 bytes) whose S3 key stays within S3's limit."""
    from mlflow.server import ARTIFACTS_DESTINATION_ENV_VAR

    if destination is None:
        destination = os.environ.get(ARTIFACTS_DESTINATION_ENV_VAR, "")
    key_prefix = destination.split("://", 1)[1].partition("/")[2] if "://" in destination else ""
    return S3_MAX_KEY_BYTES - len(key_prefix.encode()) - 1 - RUN_ROOT_BYTES


def fully_unquoted(raw: bytes) -> bytes:
    """Percent-decoded until nothing changes, as MLflow decodes a path before using it (so
    ``%252e%252e`` is ``..`` to MLflow, and here)."""
    while (decoded := unquote_to_bytes(raw)) != raw:
        raw = decoded
    return raw


def artifact_path_problem(raw: bytes, max_bytes: int) -> str | None:
    """What is wrong with an artifact path (percent-encoded bytes as sent), or None."""
    decoded = fully_unquoted(raw)
    try:
        path = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return f"artifact path {decoded!r} is not valid UTF-8"
    if match := _CONTROL.search(path):
        return f"artifact path {path!r} contains the control character U+{ord(match[0]):04X}"
    if "\\" in path:
        return f"artifact path {path!r} contains a backslash; folders are separated by '/'"
    if not path:
        return "artifact path is empty"
    if path.startswith("/"):
        return f"artifact path {path!r} is absolute; it must be relative"
    names = path.split("/")
    if path.endswith("/"):
        names.pop()  # "folder/" names the folder
    if dots := [n for n in names if n in (".", "..")]:
        return f"artifact path {path!r} contains a {dots[0]!r} segment"
    if "" in names:
        return f"artifact path {path!r} contains an empty folder name ('//')"
    if len(decoded) > max_bytes:
        return f"artifact path is {len(decoded)} bytes long; at most {max_bytes} fit in an S3 key here"
    if long := [n for n in names if len(n.encode()) > MAX_NAME_BYTES]:
        return (f"artifact path has a name of {len(long[0].encode())} bytes ({long[0][:40]!r}...); "
                f"a file or folder name is at most {MAX_NAME_BYTES} bytes")
    return None


def target_problem(scope: dict, max_path_bytes: int) -> str | None:
    """What is wrong with the request's path or query string, or None."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    if b"\x00" in fully_unquoted(raw_path) or b"\x00" in fully_unquoted(scope.get("query_string", b"")):
        return "the request's URL contains a NUL character (%00), which no MLflow name or value may hold"
    if match := _PATH_IN_URL.match(raw_path):
        if problem := artifact_path_problem(raw_path[match.end():], max_path_bytes):
            return problem
    # latin-1 keeps each byte as it is: the values are checked as the bytes that were sent.
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                                 encoding="latin-1"):
        if name in PATH_PARAMETERS and value:  # empty: the root of the listing
            if problem := artifact_path_problem(value.encode("latin-1"), max_path_bytes):
                return problem
    return None


# JSON's escape for U+0000, not itself escaped ("\\u0000" is a backslash and the text "u0000").
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


# -- the middleware -----------------------------------------------------------------------------------


class RequestLimits:
    """ASGI middleware: the checks above, then the request as it came (its body replayed)."""

    def __init__(self, app, max_path_bytes: int | None = None):
        self.app = app
        self.max_path_bytes = max_path_bytes if max_path_bytes is not None else max_artifact_path_bytes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if problem := target_problem(scope, self.max_path_bytes):
            return await _refuse(send, 400, problem)
        bound = body_bound(scope["method"], scope["path"])
        if bound is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > bound:
            return await _refuse(send, 413, _too_large(scope, bound, f"{int(declared)} bytes declared"))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            body += message.get("body", b"")
            if len(body) > bound:
                return await _refuse(send, 413, _too_large(scope, bound, f"more than {bound} bytes sent"))
            if not message.get("more_body", False):
                break
        if b"json" in headers.get(b"content-type", b"") and _JSON_NUL.search(body):
            return await _refuse(send, 400, "the request's JSON contains a NUL character (\\u0000), which no "
                                            "MLflow name or value may hold")
        if body and b"content-length" not in headers:
            # Sent chunked: Werkzeug (behind MLflow's WSGI bridge) reads a body with no length as
            # empty. It is all here now, so say how long it is.
            kept = [(k, v) for k, v in scope["headers"] if k not in (b"transfer-encoding", b"content-length")]
            scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode())]}
        return await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, when it comes

    return replayed


def _too_large(scope: dict, bound: int, got: str) -> str:
    match = _API_ROUTE.search(scope["path"])
    what = match["route"] if match and match["route"] in BODY_BOUNDS else "this route"
    return (f"request body too large ({got}): {what} takes at most {bound} bytes, the most that MLflow's own "
            f"limits allow (a tag value is at most {mlflow_limits.MAX_TAG_VAL_LENGTH} characters, a param value "
            f"{mlflow_limits.MAX_PARAM_VAL_LENGTH}, ...)")


async def _refuse(send, status: int, message: str) -> None:
    # 413 and 400 both go out with Connection: close: the server did not read the rest of the
    # body, so the connection cannot carry another request.
    body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def limit_requests(app) -> None:
    """Put the checks in front of everything else the app does (auth included)."""
    app.add_middleware(RequestLimits)


def check_request_limits(app) -> str | None:
    """The checks are the outermost middleware, and MLflow's upload routes are the ones exempt
    from body bounds (uploads moved elsewhere would be refused at the first bound)."""
    from mlstack.patches.app_routes import ARTIFACT_ROUTES, endpoints

    if not app.user_middleware or app.user_middleware[0].cls is not RequestLimits:
        return "the request checks are not the app's outermost middleware"
    for path in ARTIFACT_ROUTES:
        if endpoints(app, "PUT", path) and body_bound("PUT", path.replace("{artifact_path:path}", "1/r/artifacts/f")) is not None:
            return f"uploads to PUT {path} would be held to a body bound"
    return None


PATCH = Patch(
    name="request_limits",
    without_it="oversized bodies, NUL characters and malformed artifact paths reach MLflow (500s, unbounded memory)",
    install=limit_requests,
    check=check_request_limits,
)
