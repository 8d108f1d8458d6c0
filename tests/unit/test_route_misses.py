"""mlstack.patches.route_misses on real FastAPI apps: misses answered from memory, matches never."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Match

from mlstack.patches import route_misses
from mlstack.patches.route_misses import check_route_misses, install_route_misses


async def fallback(scope, receive, send):
    """Stands for MLflow's mounted Flask app: answers every path the native routes do not."""
    await PlainTextResponse(f"fallback {scope['method']} {scope['path']}")(scope, receive, send)


def build_app(*, with_host_route: bool = False) -> FastAPI:
    app = FastAPI()
    items = APIRouter()

    @items.get("/items/{item_id}")
    def get_item(item_id: int):
        return {"item": item_id}

    if with_host_route:
        items.routes.append(Host("admin.example", app=fallback))
    app.include_router(items, prefix="/native")
    app.mount("/", fallback)
    return app


def counting_original_matches(app: FastAPI) -> list[str]:
    """Records each path the included router really matches (not answered from memory)."""
    (router,) = route_misses._included_routers(app)
    seen: list[str] = []
    original = router.original_router.matches

    def counting(scope):
        seen.append(scope["path"])
        return original(scope)

    router.original_router.matches = counting
    return seen


def test_a_miss_is_matched_once_then_answered_from_memory():
    app = build_app()
    install_route_misses(app)
    seen = counting_original_matches(app)
    client = TestClient(app)
    for _ in range(3):
        assert client.post("/api/2.0/mlflow/runs/log-batch").text == "fallback POST /api/2.0/mlflow/runs/log-batch"
    assert seen == ["/api/2.0/mlflow/runs/log-batch"]
    assert check_route_misses(app) is None


def test_matches_are_computed_every_time_with_their_parameters():
    app = build_app()
    install_route_misses(app)
    seen = counting_original_matches(app)
    client = TestClient(app)
    assert client.get("/native/items/3").json() == {"item": 3}
    assert client.get("/native/items/4").json() == {"item": 4}
    assert client.get("/native/items/3").json() == {"item": 3}
    # The wrong method is a partial match, never taken for a miss: the mount's full match wins,
    # as without the patch, and the router is asked again each time
    assert [client.delete("/native/items/3").text for _ in range(2)] == ["fallback DELETE /native/items/3"] * 2
    assert seen.count("/native/items/3") == 4


def test_what_is_remembered_is_the_type_path_root_path_and_method():
    app = build_app()
    install_route_misses(app)
    (router,) = route_misses._included_routers(app)
    get = {"type": "http", "path": "/native/items/3", "root_path": "", "method": "GET"}
    # Under a root path of /native the same path is /items/3 to the router: a miss
    assert router.matches({**get, "root_path": "/native"})[0] == Match.NONE
    assert router.matches(dict(get))[0] == Match.FULL
    assert router.matches({**get, "method": "PATCH"})[0] == Match.PARTIAL  # path known, method not: no miss
    assert router.matches({**get, "type": "websocket"})[0] == Match.NONE
    assert router.matches(dict(get))[0] == Match.FULL


def test_memory_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(route_misses, "MEMORY_SIZE", 2)
    app = build_app()
    install_route_misses(app)
    seen = counting_original_matches(app)
    client = TestClient(app)
    for path in ("/a", "/b", "/a", "/c", "/a"):
        client.get(path)
    # /a and /b fill it; /a from memory; /c starts it over; /a is matched again
    assert seen == ["/a", "/b", "/c", "/a"]


def test_installing_twice_wraps_once():
    app = build_app()
    install_route_misses(app)
    install_route_misses(app)
    seen = counting_original_matches(app)
    TestClient(app).get("/x")
    (router,) = route_misses._included_routers(app)
    assert seen == ["/x"] and router.matches.__closure__  # one layer: the wrapper holds the original
    assert not getattr(router.matches.__closure__[0].cell_contents, "_remembers_misses", False)


def test_a_router_holding_a_host_route_is_left_alone_and_the_check_says_so():
    app = build_app(with_host_route=True)
    install_route_misses(app)
    (router,) = route_misses._included_routers(app)
    assert not getattr(router.matches, "_remembers_misses", False)
    problem = check_route_misses(app)
    assert problem and "'/native'" in problem and "matches on more than path and method" in problem


def test_the_check_fails_until_installed():
    app = build_app()
    assert "matches every request afresh" in check_route_misses(app)
    install_route_misses(app)
    assert check_route_misses(app) is None


def test_the_check_fails_without_included_routers():
    app = FastAPI()
    app.mount("/", fallback)
    assert "no included routers" in check_route_misses(app)


@pytest.fixture(scope="module")
def mlflow_fastapi_app():
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    return create_fastapi_app(flask_app)


def test_mlflows_own_app_takes_the_patch_and_still_routes(mlflow_fastapi_app):
    install_route_misses(mlflow_fastapi_app)
    assert check_route_misses(mlflow_fastapi_app) is None
    routers = route_misses._included_routers(mlflow_fastapi_app)
    tracking = {"type": "http", "path": "/api/2.0/mlflow/runs/log-batch", "root_path": "", "method": "POST"}
    for _ in range(2):
        assert all(router.matches(dict(tracking))[0] == Match.NONE for router in routers)
    native = {**tracking, "path": "/ajax-api/3.0/jobs/search", "method": "POST"}
    assert any(router.matches(dict(native))[0] == Match.FULL for router in routers)
