"""HAProxy, with the configuration mlstack.balancer writes, in front of an instance that dies after
writing an answer's headers and before its body: the moment a SIGKILL can land in, and the one the
scale-out test met once in CI (a log-batch answered with headers and no body, which MLflow's client
does not retry).

The instance here is a scripted socket server, so that the cut comes every time at that moment; the
balancer, the TLS, the client and its retries are the real ones. The scale-out test kills real
instances at a random moment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlstack.balancer import CUT_CHECK_BYTES, MULTIPART, Backends, haproxy_config
from mlstack.certificates import ensure_tls_material
from mlstack.native.processes import Handle, free_port, spawn, stop_tree, wait_until
from running_stack import environ_set
from system_packages import ensure_programs



class DyingInstance:
    """Answers each request by path from ``answers``; the first ``cuts[path]`` answers to a path
    stop after their headers (the connection closes, as when the process is killed there)."""

    def __init__(self, answers: dict[str, tuple[bytes, dict[str, str]]], cuts: dict[str, int]):
        self.answers, self.cuts = answers, dict(cuts)
        self.seen: Counter[str] = Counter()
        self.stream_read = threading.Event()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            pending = b""
            while (request := self._read_request(conn, pending)) is not None:
                method, path, pending = request
                if path == "/health":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                elif path == STREAM:
                    self._stream(conn)
                elif not self._answer(conn, method, path):
                    return  # the process died here
        except OSError:
            pass  # HAProxy closed the connection (its health check, a client gone)
        finally:
            conn.close()

    @staticmethod
    def _read_request(conn: socket.socket, pending: bytes) -> tuple[str, str, bytes] | None:
        """The next request's method and path (its body read and dropped), and the bytes after it;
        None when the connection closes first."""
        while b"\r\n\r\n" not in pending:
            if not (data := conn.recv(65536)):
                return None
            pending += data
        head, _, pending = pending.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(pending) < length:
            if not (data := conn.recv(65536)):
                return None
            pending += data
        return method, target.split("?", 1)[0], pending[length:]

    def _answer(self, conn: socket.socket, method: str, path: str) -> bool:
        """Headers, then the body unless this answer is one to cut; False when it was cut."""
        with self.lock:
            self.seen[f"{method} {path}"] += 1
            cut = self.cuts.get(path, 0) > 0
            if cut:
                self.cuts[path] -= 1
        body, extra = self.answers[path]
        fields = {"Content-Type": "application/json", "Content-Length": str(len(body)), **extra}
        conn.sendall(("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
                      + "\r\n").encode("latin-1"))
        if cut:
            return False
        if method != "HEAD":
            conn.sendall(body)
        return True

    def _stream(self, conn: socket.socket) -> None:
        """A streamed answer (no declared length): its first part, then the rest only once the
        client has its headers (``stream_read`` set), as a long-running stream would."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6\r\nfirst \r\n")
        self.stream_read.wait(timeout=60)
        conn.sendall(b"4\r\nrest\r\n0\r\n\r\n")

    def close(self) -> None:
        self.stream_read.set()
        self.listener.close()


@pytest.fixture()
def balanced():
    """Start HAProxy before a DyingInstance made by the test: yields ``start(instance) -> uri``,
    with MLflow's client trusting HAProxy's certificate and retrying at once."""
    ensure_programs({"haproxy": "haproxy"})
    work = Path(tempfile.mkdtemp(prefix="mlstack-cut-"))
    tls = ensure_tls_material(work / "tls", public_host="127.0.0.1")
    started: list[Handle] = []
    instances: list[DyingInstance] = []

    def start(instance: DyingInstance) -> str:
        instances.append(instance)
        port = free_port()
        config = work / "haproxy.cfg"
        config.write_text(haproxy_config(bind="127.0.0.1", port=port, bundle=tls.bundle,
                                         backends=Backends(addresses=(("127.0.0.1", instance.port),)),
                                         health_host="127.0.0.1"))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        log = work / "haproxy.log"
        handle = spawn(["haproxy", "-db", "-f", str(config)], env=dict(os.environ), log_path=log)
        started.append(handle)
        uri = f"https://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(uri + "/health", timeout=2, verify=str(tls.certificate)).status_code == 200
            except requests.RequestException:
                return False

        wait_until(answers, what="HAProxy", timeout=30, handle=handle, log_path=log)
        return uri

    with environ_set({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                      "MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls.certificate)}):
        try:
            yield start
        finally:
            for handle in started:
                stop_tree(handle)
            for instance in instances:
                instance.close()
            shutil.rmtree(work, ignore_errors=True)


STREAM = "/stream"
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
CREATE_RUN = "/api/2.0/mlflow/runs/create"
GET_EXPERIMENT = "/api/2.0/mlflow/experiments/get"
UPLOAD_START = f"{MULTIPART}/create/1/run/artifacts/checkpoints/step-1"
UPLOAD_COMPLETE = f"{MULTIPART}/complete/1/run/artifacts/checkpoints/step-1"


def artifact_post(uri: str, path: str):
    """A multipart upload call as MLflow's artifact repository sends it (its retries included)."""
    from mlflow.utils.rest_utils import MlflowHostCreds, augmented_raise_for_status, http_request

    creds = MlflowHostCreds(uri, server_cert_path=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    resp = http_request(creds, path, "POST", json={"path": "optimizer.pt", "num_parts": 1})
    augmented_raise_for_status(resp)
    return resp.json()


def test_a_metrics_write_cut_after_its_headers_is_sent_again(balanced):
    instance = DyingInstance({LOG_BATCH: (b"{}", {})}, cuts={LOG_BATCH: 1})
    client = MlflowClient(balanced(instance))
    client.log_batch("0" * 32, metrics=[Metric("loss", 0.5, 1, 1)])  # raises if the cut reached it
    assert instance.seen[f"POST {LOG_BATCH}"] == 2, instance.seen


def test_a_read_cut_after_its_headers_is_sent_again(balanced):
    answer = b'{"experiment": {"experiment_id": "7", "name": "cut-read", "lifecycle_stage": "active"}}'
    instance = DyingInstance({GET_EXPERIMENT: (answer, {})}, cuts={GET_EXPERIMENT: 1})
    client = MlflowClient(balanced(instance))
    assert client.get_experiment("7").name == "cut-read"
    assert instance.seen[f"GET {GET_EXPERIMENT}"] == 2, instance.seen


def test_a_create_cut_after_its_headers_is_not_made_twice(balanced):
    """A run may already be stored when its answer is cut: the client gets an error, and the
    request is not sent again (a second run would be made)."""
    answer = b'{"run": {"info": {"run_id": "' + b"1" * 32 + b'", "experiment_id": "0"}, "data": {}}}'
    instance = DyingInstance({CREATE_RUN: (answer, {})}, cuts={CREATE_RUN: 1})
    client = MlflowClient(balanced(instance))
    with pytest.raises(MlflowException, match="Connection broken|IncompleteRead"):
        client.create_run("0")
    assert instance.seen[f"POST {CREATE_RUN}"] == 1, instance.seen


def test_the_start_of_a_multipart_upload_cut_after_its_headers_is_sent_again(balanced):
    """A start sent twice leaves one unused upload in S3 (``make gc`` aborts it); its completion is
    not sent again (a second completion of the same upload fails)."""
    started = b'{"upload_id": "u-1", "credentials": []}'
    instance = DyingInstance({UPLOAD_START: (started, {}), UPLOAD_COMPLETE: (b"{}", {})},
                             cuts={UPLOAD_START: 1, UPLOAD_COMPLETE: 1})
    uri = balanced(instance)
    assert artifact_post(uri, UPLOAD_START)["upload_id"] == "u-1"
    assert instance.seen[f"POST {UPLOAD_START}"] == 2, instance.seen
    with pytest.raises(MlflowException, match="Connection broken|IncompleteRead"):
        artifact_post(uri, UPLOAD_COMPLETE)
    assert instance.seen[f"POST {UPLOAD_COMPLETE}"] == 1, instance.seen


def test_whole_answers_pass_unchanged(balanced):
    """A body larger than the held size streams whole; a HEAD answer, which declares a length and
    has no body, is not taken for a cut one."""
    large = os.urandom(20 * CUT_CHECK_BYTES)
    small = os.urandom(CUT_CHECK_BYTES)
    instance = DyingInstance({"/large": (large, {"Content-Type": "application/octet-stream"}),
                              "/small": (small, {"Content-Type": "application/octet-stream"})}, cuts={})
    uri = balanced(instance)
    verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    for path, body in (("/large", large), ("/small", small)):
        got = requests.get(uri + path, timeout=30, verify=verify)
        assert got.status_code == 200 and got.content == body, (path, got.status_code, len(got.content))
        head = requests.head(uri + path, timeout=30, verify=verify)
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(body)), (path, head.status_code)
    assert instance.seen == Counter({"GET /large": 1, "HEAD /large": 1, "GET /small": 1, "HEAD /small": 1})


def test_a_stream_is_not_held(balanced):
    """An answer of no declared length goes on as it comes: the client has its headers and first
    part while the instance still holds the rest back (held by HAProxy, the read times out)."""
    instance = DyingInstance({}, cuts={})
    uri = balanced(instance)
    with requests.get(uri + STREAM, stream=True, timeout=10, verify=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]) as got:
        assert got.status_code == 200
        instance.stream_read.set()
        assert got.raw.read() == b"first rest"
