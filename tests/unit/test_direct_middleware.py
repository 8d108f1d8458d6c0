"""mlstack.patches.direct_middleware on MLflow's own two middlewares, added to a FastAPI app by
MLflow's own functions: requests they do nothing for skip them, and every answer is the same as
with MLflow's middlewares (a workspace header refused, a gateway request timed)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from mlflow.server import fastapi_app as mlflow_fastapi
from mlflow.utils import workspace_context

from mlstack.patches.direct_middleware import check_direct_middleware, install_direct_middleware

GATEWAY_HEADER = b"x-mlflow-gateway-duration-ms"


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/api/2.0/mlflow/x")
    @app.get("/gateway/x")
    def answer():
        return {"workspace_resolved": workspace_context._IS_WORKSPACE_RESOLVED.get()}

    mlflow_fastapi.add_fastapi_workspace_middleware(app)
    mlflow_fastapi.add_gateway_timing_middleware(app)
    return app


def call(app, path: str, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict, dict]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1), "server": ("localhost", 80)}
    out = {"body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], dict(message["headers"])
        else:
            out["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return out["status"], json.loads(out["body"]), out["headers"]


REQUESTS = [("/api/2.0/mlflow/x", []), ("/gateway/x", []), ("/api/2.0/mlflow/x", [(b"x-mlflow-workspace", b"team")])]


def outcome(app, path, headers):
    status, body, response_headers = call(app, path, headers)
    return status, body, GATEWAY_HEADER in response_headers


@pytest.fixture
def dispatch_calls(monkeypatch):
    """What MLflow's two dispatch functions called: both look up the routed path ("path"); only the
    workspace one resolves a workspace ("workspace")."""
    calls = []
    resolve, routed = mlflow_fastapi.resolve_workspace_for_request_if_enabled, mlflow_fastapi.get_routed_asgi_path
    monkeypatch.setattr(mlflow_fastapi, "resolve_workspace_for_request_if_enabled",
                        lambda *a: calls.append("workspace") or resolve(*a))
    monkeypatch.setattr(mlflow_fastapi, "get_routed_asgi_path", lambda r: calls.append("path") or routed(r))
    return calls


def test_the_answers_are_mlflows_and_only_gateway_or_workspace_requests_run_its_middleware(dispatch_calls, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_WORKSPACES", raising=False)
    theirs = build_app()
    expected = [outcome(theirs, path, headers) for path, headers in REQUESTS]
    assert expected[0] == (200, {"workspace_resolved": True}, False)
    assert expected[1][2] is True  # timed
    assert expected[2][0] >= 400 and "workspaces are not enabled" in expected[2][1]["message"]

    ours = build_app()
    install_direct_middleware(ours)
    dispatch_calls.clear()
    assert outcome(ours, *REQUESTS[0]) == expected[0]
    assert dispatch_calls == []  # neither of MLflow's middlewares ran
    assert outcome(ours, *REQUESTS[1]) == expected[1]
    assert dispatch_calls == ["path"]  # the timing middleware only
    dispatch_calls.clear()
    assert outcome(ours, *REQUESTS[2]) == expected[2]
    assert dispatch_calls == ["path", "workspace"]  # the workspace middleware only


def test_with_workspaces_enabled_the_workspace_middleware_runs_for_every_request(dispatch_calls, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    # Resolving a workspace opens MLflow's default store, a SQLite file in the working directory.
    monkeypatch.chdir(tmp_path)
    app = build_app()
    install_direct_middleware(app)
    dispatch_calls.clear()
    call(app, "/api/2.0/mlflow/x")  # answered however MLflow answers it; its middleware ran
    assert dispatch_calls == ["path", "workspace"]


def test_the_check_fails_until_both_are_wrapped_and_names_a_missing_one():
    app = build_app()
    assert "gateway_timing_middleware still runs as a BaseHTTPMiddleware" in check_direct_middleware(app)
    install_direct_middleware(app)
    assert check_direct_middleware(app) is None
    bare = FastAPI()
    mlflow_fastapi.add_gateway_timing_middleware(bare)
    install_direct_middleware(bare)
    assert check_direct_middleware(bare) == "MLflow's app has no middleware workspace_context_middleware"
