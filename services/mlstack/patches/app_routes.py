"""Finding MLflow's routes in its FastAPI app, however FastAPI groups them."""

from __future__ import annotations

import inspect

# MLflow's proxied artifact routes (GET downloads, PUT uploads), as mlflow.server.artifact_router declares them.
ARTIFACT_ROUTES = (
    "/api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}",
    "/ajax-api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}",
)


def routes_of(router):
    """(router, index, route) of every route, those of included routers too.

    FastAPI 0.13x+ keeps an included router whole (an ``_IncludedRouter`` holding
    ``original_router``) instead of copying its routes into the app's list, which is where
    MLflow's artifact routes live; a search of the app's own list found nothing, and downloads
    silently went through MLflow's temporary file.
    """
    for i, route in enumerate(router.routes):
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from routes_of(included)
        else:
            yield router, i, route


def endpoints(app, method: str, path: str) -> list:
    """The endpoint functions of the app's ``method`` routes declared as ``path``."""
    return [route.endpoint for _, _, route in routes_of(app.router)
            if getattr(route, "path", None) == path and method in (getattr(route, "methods", None) or ())]


def asks_for(function, name: str, obj) -> bool:
    """Whether ``function``'s own code reads the global ``name`` and that global is ``obj``:
    how a check sees that MLflow's handler still consults a hook we implement."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names and function.__globals__.get(name) is obj


def qualname(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"
