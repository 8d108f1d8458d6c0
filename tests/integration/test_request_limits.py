"""Oversized bodies, NUL characters and malformed artifact paths against the real server.

Each was a 500 or unbounded memory before services/mlstack/request_limits.py; each must now be
a 4xx naming the problem, before MLflow (or its database, or S3) sees the request. Requests go
out through http.client so that paths reach the server byte for byte as written here.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
from urllib.parse import quote, urlsplit

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mlstack.request_limits import BODY_BOUNDS, DEFAULT_BODY_BOUND

from trainer_support import artifact_prefix, read_object

MiB = 1024 * 1024


class Server:
    def __init__(self, stack):
        url = urlsplit(stack.uri)
        self.host, self.port = url.hostname, url.port
        user, password = stack.trainer_auth
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def request(self, method: str, target: str, body=None, headers: dict | None = None,
                chunked: bool = False) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            try:
                conn.request(method, target, body=body, encode_chunked=chunked,
                             headers={"Authorization": self.auth, **(headers or {})})
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered before the whole body was read (a refusal): the answer is there to read
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data) if data else {}
        except ValueError:
            return resp.status, {"raw": data[:200]}

    def post_json(self, route: str, body, **kwargs) -> tuple[int, dict]:
        """``body``: a dict to encode, or bytes (or an iterable of them) as they are."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.request("POST", f"/api/2.0/mlflow/{route}", data, {"Content-Type": "application/json"}, **kwargs)


@pytest.fixture(scope="module")
def server(native_stack) -> Server:
    return Server(native_stack)


@pytest.fixture(scope="module")
def run(native_stack):
    user, password = native_stack.trainer_auth
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    client = MlflowClient(native_stack.uri)
    exp = client.get_experiment_by_name("request-limits") or client.get_experiment(
        client.create_experiment("request-limits"))
    created = client.create_run(exp.experiment_id)
    yield client, created
    client.set_terminated(created.info.run_id)


# -- artifact paths ---------------------------------------------------------------------------------

BAD_PATHS = {  # as sent in the URL -> what the 400 says
    "a\\b.bin": "contains a backslash",
    "a%5Cb.bin": "contains a backslash",
    "a%00b.bin": "NUL character",
    "a%0Ab.bin": "control character U+000A",
    "a%01b.bin": "control character U+0001",
    "a%FF%FEb.bin": "is not valid UTF-8",
    "../x.bin": "contains a '..' segment",
    "%2E%2E/x.bin": "contains a '..' segment",
    "a/..%2F..%2Fx.bin": "contains a '..' segment",
    "a/%252e%252e/x.bin": "contains a '..' segment",  # MLflow decodes twice
    "./x.bin": "contains a '.' segment",
    "a//b.bin": "empty folder name",
    "x" * 300 + ".bin": "a file or folder name is at most 255 bytes",
    "/".join(["d" * 200] * 6) + "/f.bin": "fit in an S3 key",
}


def artifact_routes(run) -> dict[str, tuple[str, str, bytes | None]]:
    """Every route that takes an artifact path, as a template of (method, target, body) on ``{p}``."""
    created = run[1]
    root = f"{created.info.experiment_id}/{created.info.run_id}/artifacts"
    rid = created.info.run_id
    return {
        "download": ("GET", f"/api/2.0/mlflow-artifacts/artifacts/{root}/{{p}}", None),
        "download (ajax)": ("GET", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{root}/{{p}}", None),
        "upload": ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{root}/probe/{{p}}", b"data"),
        "upload (ajax)": ("PUT", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{root}/probe/{{p}}", b"data"),
        "delete": ("DELETE", f"/api/2.0/mlflow-artifacts/artifacts/{root}/probe/{{p}}", None),
        "list": ("GET", f"/api/2.0/mlflow-artifacts/artifacts?path={root}/{{p}}", None),
        "list (ajax)": ("GET", f"/ajax-api/2.0/mlflow-artifacts/artifacts?path={root}/{{p}}", None),
        "presigned download": ("GET", f"/api/2.0/mlflow-artifacts/presigned/{root}/{{p}}", None),
        "multipart create": ("POST", f"/api/2.0/mlflow-artifacts/mpu/create/{root}/probe/{{p}}", b"{}"),
        "run get-artifact": ("GET", f"/get-artifact?path={{p}}&run_uuid={rid}", None),
        "run artifact list": ("GET", f"/api/2.0/mlflow/artifacts/list?run_id={rid}&path={{p}}", None),
    }


@pytest.mark.parametrize("route", ["download", "download (ajax)", "upload", "upload (ajax)", "delete", "list",
                                   "list (ajax)", "presigned download", "multipart create", "run get-artifact",
                                   "run artifact list"])
def test_malformed_artifact_paths_get_400_naming_the_problem(server, run, native_stack, route):
    client, created = run
    method, template, body = artifact_routes(run)[route]
    prefix = artifact_prefix(client, created.info.run_id)
    before = native_stack.bucket_keys(prefix)
    answers = {}
    for path, problem in BAD_PATHS.items():
        status, error = server.request(method, template.format(p=path), body,
                                       {"Content-Type": "application/json"} if method == "POST" else None)
        answers[path[:40]] = (status, error.get("error_code"), problem in error.get("message", ""))
    assert answers == {path[:40]: (400, "INVALID_PARAMETER_VALUE", True) for path in BAD_PATHS}
    assert native_stack.bucket_keys(prefix) == before  # nothing stored under a mangled key


def test_well_formed_paths_still_work_on_every_route(server, run, native_stack):
    client, created = run
    method, template, _ = artifact_routes(run)["upload"]
    assert server.request(method, template.format(p=quote("ok/é file.bin")), b"stored")[0] == 200
    assert read_object(native_stack, artifact_prefix(client, created.info.run_id) + "probe/ok/é file.bin") == b"stored"
    root = f"{created.info.experiment_id}/{created.info.run_id}/artifacts"
    status, listing = server.request("GET", f"/api/2.0/mlflow-artifacts/artifacts?path={root}/probe/ok")
    assert status == 200 and [f["path"] for f in listing["files"]] == ["é file.bin"]
    assert server.request("GET", f"/api/2.0/mlflow-artifacts/artifacts?path=")[0] == 200  # the root listing


# -- NUL characters (PostgreSQL cannot store them) ------------------------------------------------------


def test_nul_characters_get_400_and_nothing_is_stored(server, run):
    client, created = run
    rid = created.info.run_id
    for target in (f"/api/2.0/mlflow/runs/get?run_id=%00", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=a%00b",
                   f"/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=a%00"):
        status, error = server.request("GET", target)
        assert (status, "URL contains a NUL character" in error["message"]) == (400, True), target
    for route, body in (("runs/set-tag", {"run_id": rid, "key": "nul", "value": "v\u0000"}),
                        ("experiments/create", {"name": "with-nul\u0000"}),
                        ("runs/create", {"experiment_id": created.info.experiment_id, "run_name": "a\u0000"})):
        status, error = server.post_json(route, body)
        assert (status, "JSON contains a NUL character" in error["message"]) == (400, True), route
    # The text "\u0000" (an escaped backslash, then u0000) is no NUL: it is stored as sent.
    assert server.post_json("runs/set-tag", {"run_id": rid, "key": "text", "value": "a\\u0000b"})[0] == 200
    tags = client.get_run(rid).data.tags
    assert tags["text"] == "a\\u0000b" and "nul" not in tags
    assert client.get_experiment_by_name("with-nul") is None


# -- body sizes ---------------------------------------------------------------------------------------


def worker_peak_rss(native_stack) -> int:
    """Sum of the peak resident memory (VmHWM) of the MLflow server's processes, in bytes."""
    root = psutil.Process(native_stack.stack.handle("mlflow").pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        status = open(f"/proc/{proc.pid}/status").read()
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    return total


def test_100_mb_tag_value_is_refused_with_413_reading_little(server, run, native_stack):
    client, created = run
    rid = created.info.run_id
    value = b"v" * 100_000_000
    body = b'{"run_id": "%s", "key": "huge", "value": "%s"}' % (rid.encode(), value)
    before = worker_peak_rss(native_stack)
    status, error = server.post_json("runs/set-tag", body)
    grew = worker_peak_rss(native_stack) - before
    assert status == 413, error
    assert f"runs/set-tag takes at most {BODY_BOUNDS['runs/set-tag']} bytes" in error["message"]
    assert grew < 50 * MiB, f"the server's peak memory grew {grew / MiB:.0f} MiB"

    # Sent chunked, with no Content-Length to trust: counted as it arrives, refused all the same.
    def chunks():
        yield b'{"run_id": "%s", "key": "huge", "value": "' % rid.encode()
        for _ in range(100):
            yield b"v" * 1_000_000
        yield b'"}'

    before = worker_peak_rss(native_stack)
    status, error = server.post_json("runs/set-tag", chunks(), chunked=True)
    assert status == 413 and "more than" in error["message"], error
    assert worker_peak_rss(native_stack) - before < 50 * MiB
    assert "huge" not in client.get_run(rid).data.tags


def test_requests_at_mlflows_own_limits_pass(server, run):
    """The bounds sit above the largest request MLflow's limits allow, in the widest JSON encoding."""
    client, created = run
    rid = created.info.run_id
    emoji = "\U0001F600"  # one character to MLflow, 12 bytes of escaped JSON
    status, _ = server.post_json("runs/set-tag", {"run_id": rid, "key": "k" * 250, "value": emoji * 8000})
    assert status == 200
    assert client.get_run(rid).data.tags["k" * 250] == emoji * 8000
    # The largest batch: 100 tags and 100 params (at most), 800 metrics (1000 entries at most).
    batch = {"run_id": rid,
             "metrics": [{"key": f"m{i:03d}" + "x" * 246, "value": i, "timestamp": 0, "step": 0} for i in range(800)],
             "params": [{"key": f"p{i:02d}" + "x" * 247, "value": emoji * 6000} for i in range(100)],
             "tags": [{"key": f"t{i:02d}" + "x" * 247, "value": emoji * 8000} for i in range(100)]}
    status, error = server.post_json("runs/log-batch", batch)
    assert status == 200, error
    data = client.get_run(rid).data
    assert (len(data.metrics), len(data.params)) == (800, 100)
    # Chunked and small: fine.
    status, _ = server.post_json("runs/set-tag", iter([b'{"run_id": "%s", ' % rid.encode(), b'"key": "c", "value": "v"}']),
                                 chunked=True)
    assert status == 200 and client.get_run(rid).data.tags["c"] == "v"


def test_artifact_uploads_stay_unbounded_and_streamed(server, run, native_stack):
    client, created = run
    root = f"{created.info.experiment_id}/{created.info.run_id}/artifacts"
    data = os.urandom(DEFAULT_BODY_BOUND + 8 * MiB)  # over every body bound
    before = worker_peak_rss(native_stack)
    status, _ = server.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{root}/big/optimizer.pt",
                               (data[i:i + MiB] for i in range(0, len(data), MiB)), chunked=True)
    assert status == 200
    assert worker_peak_rss(native_stack) - before < len(data) // 2  # streamed to S3, never held whole
    assert read_object(native_stack, artifact_prefix(client, created.info.run_id) + "big/optimizer.pt") == data
