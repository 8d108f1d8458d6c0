"""The pre-flight probe of the tracking server reads HTTP status codes and changes no shared setting.

A throwaway HTTP server on loopback stands in for MLflow: each case is about what the probe does
with an answer (or with no answer), not about MLflow itself. The handler records MLflow's retry
settings *while* the probe is in flight, since parallel sweep trials share the process.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.tracking import MlflowClient
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)

from mltrainer import server_probe
from mltrainer.errors import TrackingError
from mltrainer.tracking import check_server


def retry_settings() -> tuple:
    return (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
            MLFLOW_HTTP_REQUEST_TIMEOUT.get())


@pytest.fixture
def fake_server():
    """Start a server answering with the statuses in ``answers`` (the last one repeats)."""
    servers = []

    def start(*answers: int):
        seen = {"settings": [], "environ": [], "auth": []}
        queue = list(answers)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                seen["settings"].append(retry_settings())
                seen["environ"].append(dict(os.environ))
                seen["auth"].append(self.headers.get("Authorization"))
                status = queue.pop(0) if len(queue) > 1 else queue[0]
                body = json.dumps({"experiments": []} if status == 200 else {"error_code": "X", "message": "no"})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            do_POST = do_GET  # noqa: N815 - MLflow's client searches by POST

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_uri() -> str:
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_probe_leaves_environment_and_retry_settings_alone_while_in_flight(fake_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    uri, seen = fake_server(200)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    environ_before, settings_before = dict(os.environ), retry_settings()

    check_server(MlflowClient(tracking_uri=uri))

    assert seen["settings"] == [settings_before]  # what a thread uploading meanwhile would have used
    assert seen["environ"] == [environ_before]
    assert dict(os.environ) == environ_before and retry_settings() == settings_before
    assert seen["auth"][0].startswith("Basic ")  # the configured credentials were sent


def test_check_server_probes_the_clients_uri_not_the_environments(fake_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port_uri())
    uri, seen = fake_server(200)
    check_server(MlflowClient(tracking_uri=uri))
    assert len(seen["settings"]) == 1


def test_unreachable_server_is_a_tracking_error_naming_the_uri():
    uri = closed_port_uri()
    environ_before, settings_before = dict(os.environ), retry_settings()
    with pytest.raises(TrackingError) as raised:
        server_probe.check_server(uri)
    assert str(raised.value).startswith(f"the MLflow server at {uri} is unreachable: ")
    assert dict(os.environ) == environ_before and retry_settings() == settings_before


def test_401_means_the_credentials(fake_server):
    uri, _ = fake_server(401)
    with pytest.raises(TrackingError) as raised:
        server_probe.check_server(uri)
    assert str(raised.value) == (f"the MLflow server at {uri} rejected the credentials "
                                 "(MLFLOW_TRACKING_USERNAME/PASSWORD)")


def test_a_busy_server_is_asked_again_until_it_answers(fake_server, monkeypatch):
    monkeypatch.setattr(server_probe, "BUSY_INTERVAL_SECONDS", 0.01)
    uri, seen = fake_server(503, 503, 503, 200)
    server_probe.check_server(uri)
    assert len(seen["settings"]) >= 4  # urllib3 may retry a 503 itself once (PROBE_RETRIES) before the loop does


def test_other_statuses_say_not_usable_with_the_status(fake_server):
    uri, _ = fake_server(500)
    with pytest.raises(TrackingError) as raised:
        server_probe.check_server(uri)
    assert str(raised.value).startswith(f"the MLflow server at {uri} is not usable: HTTP 500")


def test_a_file_uri_is_refused():
    with pytest.raises(TrackingError, match="must be the stack's http"):
        server_probe.check_server("file:///tmp/mlruns")
