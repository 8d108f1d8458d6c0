"""Two of MLflow's middlewares step aside, as plain ASGI, on the requests where they do nothing.

MLflow 3.17 adds two ``@app.middleware("http")`` functions to its FastAPI app, and Starlette runs
each in a ``BaseHTTPMiddleware``: per request, a task group and a task for the rest of the app,
and per chunk of a request or response body, a task group racing the chunk against a
disconnect. On the proxied transfer path that is every 64 KiB of a checkpoint, through both
layers: relaying 400 MB through the app in-process took 2.2 CPU-s with them and 1.2 CPU-s
without (bench/README.md).

* ``gateway_timing_middleware`` times requests under ``/gateway/`` and, for every other path,
  only calls the rest of the app;
* ``workspace_context_middleware`` resolves the request's workspace; with workspaces disabled
  and no workspace header it sets the request's workspace to none, calls the rest of the app and
  clears it.

Each is wrapped in a plain ASGI middleware that does exactly that for those requests and hands
every other request (a gateway path; workspaces enabled; a workspace header, which MLflow
refuses) to MLflow's own middleware, unchanged.
"""

from __future__ import annotations

from mlstack.patches.self_check import Patch

GATEWAY_TIMING = "gateway_timing_middleware"
WORKSPACE_CONTEXT = "workspace_context_middleware"


def install_direct_middleware(app) -> None:
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    wrappers = {GATEWAY_TIMING: GatewayTimingOutsideGateway, WORKSPACE_CONTEXT: WorkspaceContextWhenDisabled}
    for i, entry in enumerate(app.user_middleware):
        dispatch = entry.kwargs.get("dispatch") if entry.cls is BaseHTTPMiddleware else None
        wrapper = wrappers.get(getattr(dispatch, "__name__", None))
        if wrapper is not None:
            app.user_middleware[i] = Middleware(wrapper, dispatch=dispatch)
    app.middleware_stack = None  # built on the first request, from the list above


def check_direct_middleware(app) -> str | None:
    """Both of MLflow's middlewares are in the app, each inside our wrapper."""
    from starlette.middleware.base import BaseHTTPMiddleware

    for name, wrapper in ((GATEWAY_TIMING, GatewayTimingOutsideGateway),
                          (WORKSPACE_CONTEXT, WorkspaceContextWhenDisabled)):
        classes = [m.cls for m in app.user_middleware
                   if getattr(m.kwargs.get("dispatch"), "__name__", None) == name]
        if not classes:
            return f"MLflow's app has no middleware {name}"
        if BaseHTTPMiddleware in classes or wrapper not in classes:
            return f"MLflow's {name} still runs as a BaseHTTPMiddleware on every request"
    return None


PATCH = Patch(
    name="direct_middleware",
    without_it="every request, and every 64 KiB of a proxied upload or download, passes through two "
               "BaseHTTPMiddleware layers that do nothing for it (about 2.5 CPU-s per GB relayed)",
    install=install_direct_middleware,
    check=check_direct_middleware,
)


class _SteppingAside:
    """MLflow's ``BaseHTTPMiddleware(dispatch)`` for the requests ``acts_on`` names; the others
    get ``around`` the rest of the app, what that dispatch does for them."""

    def __init__(self, app, dispatch):
        from starlette.middleware.base import BaseHTTPMiddleware

        self.app = app
        self.mlflows = BaseHTTPMiddleware(app, dispatch=dispatch)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.acts_on(scope):
            await self.mlflows(scope, receive, send)
        else:
            await self.around(scope, receive, send)

    def acts_on(self, scope) -> bool:
        raise NotImplementedError

    async def around(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


class GatewayTimingOutsideGateway(_SteppingAside):
    def __init__(self, app, dispatch):
        from mlflow.server.handlers import _add_static_prefix

        super().__init__(app, dispatch)
        self.prefix = _add_static_prefix("/gateway/")  # the prefix MLflow's middleware tests

    def acts_on(self, scope) -> bool:
        return _routed_path(scope).startswith(self.prefix)


class WorkspaceContextWhenDisabled(_SteppingAside):
    def __init__(self, app, dispatch):
        from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
        from mlflow.server.workspace_helpers import WORKSPACE_HEADER_NAME
        from mlflow.utils.workspace_context import clear_server_request_workspace, set_server_request_workspace

        super().__init__(app, dispatch)
        self.enabled = MLFLOW_ENABLE_WORKSPACES.get  # read per request, as MLflow's middleware does
        self.header = WORKSPACE_HEADER_NAME.lower().encode("latin-1")
        self.set_workspace, self.clear_workspace = set_server_request_workspace, clear_server_request_workspace

    def acts_on(self, scope) -> bool:
        return self.enabled() or any(name == self.header and value.strip() for name, value in scope.get("headers", ()))

    async def around(self, scope, receive, send) -> None:
        self.set_workspace(None)
        try:
            await self.app(scope, receive, send)
        finally:
            self.clear_workspace()


def _routed_path(scope) -> str:
    from mlflow.server.asgi_utils import get_routed_asgi_path
    from starlette.requests import Request

    return get_routed_asgi_path(Request(scope))
