"""The self-check of patches (mlstack.patches.self_check): a patch that did not take hold stops the
server, naming the patch and the MLflow version, unless the operator allowed running without it.

The mechanism is pure logic and is tested here with made-up patches; the route lookup of the
streaming download patch is tested on MLflow's real artifact router in a real FastAPI app, the
failure that started this (FastAPI 0.165 groups an included router's routes differently)."""

from __future__ import annotations

import logging

import mlflow
import pytest
from fastapi import APIRouter, FastAPI
from mlflow.server.artifact_router import artifact_router

from mlstack.patches import streaming_download
from mlstack.patches.self_check import Patch, Patching, PatchesNotInEffect


def made_up(name: str, problem: str | None = None, install=lambda: None) -> Patch:
    return Patch(name=name, without_it=f"{name} is off", install=install, check=lambda app: problem)


def test_a_patch_that_did_not_take_hold_stops_the_server_naming_it_and_the_version():
    patching = Patching()
    patching.install(made_up("fine"))
    patching.install(made_up("broken", "route GET /x not found"))
    with pytest.raises(PatchesNotInEffect) as refused:
        patching.require_in_effect(app=None, allowed=set())
    message = str(refused.value)
    assert f"patch broken did not take hold on MLflow {mlflow.__version__}" in message
    assert "route GET /x not found" in message and "broken is off" in message
    assert "MLSTACK_ALLOW_UNPATCHED=broken " in message
    assert "fine" not in message


def test_an_install_that_raises_is_a_patch_not_in_effect_not_a_crash():
    def install():
        raise AttributeError("module 'mlflow.server.auth' has no attribute '_authenticate_cached'")

    patching = Patching()
    patching.install(made_up("login_limiter", install=install))
    with pytest.raises(PatchesNotInEffect, match="installing it raised AttributeError: .*_authenticate_cached"):
        patching.require_in_effect(app=None, allowed=set())


def test_a_check_that_raises_counts_as_failed():
    def check(app):
        raise KeyError("routes")

    patching = Patching()
    patching.install(Patch("p", "p is off", lambda: None, check))
    with pytest.raises(PatchesNotInEffect, match="patch p did not take hold.*its check raised KeyError"):
        patching.require_in_effect(app=None, allowed=set())


def test_allowed_patches_start_with_a_loud_warning_each(caplog):
    patching = Patching()
    for name in ("a", "b", "c"):
        patching.install(made_up(name, None if name == "c" else f"{name} missing"))
    with caplog.at_level(logging.WARNING, logger="mlstack.patches.self_check"):
        patching.require_in_effect(app=None, allowed={"a", "b"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(w.startswith("RUNNING WITHOUT PATCH ") and f"MLflow {mlflow.__version__}" in w for w in warnings)
    assert "a missing" in warnings[0] and "b missing" in warnings[1]


def test_allowing_one_does_not_allow_another():
    patching = Patching()
    patching.install(made_up("a", "a missing"))
    patching.install(made_up("b", "b missing"))
    with pytest.raises(PatchesNotInEffect) as refused:
        patching.require_in_effect(app=None, allowed={"a"})
    assert "patch b did not take hold" in str(refused.value) and "patch a " not in str(refused.value)


def test_the_allow_variable_is_read_from_the_environment(monkeypatch):
    patching = Patching()
    patching.install(made_up("a", "a missing"))
    monkeypatch.setenv("MLSTACK_ALLOW_UNPATCHED", " a , ")
    patching.require_in_effect(app=None)
    monkeypatch.setenv("MLSTACK_ALLOW_UNPATCHED", "")
    with pytest.raises(PatchesNotInEffect):
        patching.require_in_effect(app=None)


def test_an_unknown_name_in_the_allow_variable_is_refused_naming_the_patches():
    patching = Patching()
    patching.install(made_up("streaming_download"))
    with pytest.raises(PatchesNotInEffect, match="names streaming_dowload, which is no patch.*: streaming_download"):
        patching.require_in_effect(app=None, allowed={"streaming_dowload"})


def mlflow_like_app() -> FastAPI:
    app = FastAPI()
    app.include_router(artifact_router)  # as mlflow.server.fastapi_app does
    return app


def test_streaming_download_takes_hold_on_mlflows_router_in_this_fastapi():
    app = mlflow_like_app()
    assert "still served by mlflow.server.artifact_router.download_artifact" in streaming_download.check_streaming_download(app)
    assert streaming_download.install_streaming_download(app) == 2  # /api and /ajax-api
    assert streaming_download.check_streaming_download(app) is None


def test_streaming_download_check_fails_when_the_route_is_where_it_does_not_look():
    """What a newer MLflow or FastAPI can do: the route exists, somewhere the patch does not find it."""
    moved = APIRouter()
    for route in artifact_router.routes:
        path = route.path.replace("/2.0/", "/3.0/") if "GET" in route.methods else route.path
        moved.add_api_route(path, route.endpoint, methods=list(route.methods))
    app = FastAPI()
    app.include_router(moved)
    assert streaming_download.install_streaming_download(app) == 0
    assert streaming_download.check_streaming_download(app) == (
        "no GET route /api/2.0/mlflow-artifacts/artifacts/{artifact_path:path} found in MLflow's app")
