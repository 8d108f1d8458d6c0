"""FastAPI's included routers remember the paths they do not serve.

MLflow 3.17's FastAPI app holds its native routes (gateway, jobs, traces, artifacts...) in
included routers, and the Flask app, which serves the tracking API, as its last mount. So a
tracking request (a ``log_batch``, a ``get_run``) is tried against every native route twice
before it reaches Flask: by MLflow's permission middleware (fail-closed by default, it refuses a
native route without a validator, so it asks whether the path is one) and by FastAPI's router.
Each pass took 0.13 ms in-process on the bench host, 3.6 µs with this patch: the two passes were
about 2% of the server's CPU per ``log_batch`` of 100 points (bench/README.md).

Each included router at the top of the app now remembers the requests it did not match, by
(scope type, path, root path, method), and answers those from memory. A miss depends on nothing
else as long as the router's routes match on path and method alone, which install checks: a
router holding any other kind of route (a ``Host``, which matches on a header) is left as it is,
and the check then stops the server. A match is never remembered: it is computed each time,
with its path parameters. The routes are fixed once MLflow has built the app; the memory holds
``MEMORY_SIZE`` requests per router and starts over when full, so paths that differ on every
request (artifact paths) cost one lookup and some memory, never a wrong answer.
"""

from __future__ import annotations

from mlstack.patches.self_check import Patch

MEMORY_SIZE = 4096  # requests remembered per router: the API's few hundred paths, with room to spare


def install_route_misses(app) -> None:
    for router in _included_routers(app):
        if not getattr(router.matches, "_remembers_misses", False) and _matches_on_path_and_method_only(router):
            router.matches = _remembering_misses(router.matches)  # on the instance: this router only


def _included_routers(app) -> list:
    from fastapi.routing import _IncludedRouter

    return [route for route in app.routes if isinstance(route, _IncludedRouter)]


def _matches_on_path_and_method_only(router) -> bool:
    """Every route under the router matches with Starlette's or FastAPI's own code, which reads the
    scope's type, path, root path and method and nothing else (a subclass overriding it would not)."""
    from fastapi.routing import APIRoute, APIWebSocketRoute
    from starlette.routing import Mount, Route, WebSocketRoute

    known = {kind.matches for kind in (Route, APIRoute, WebSocketRoute, APIWebSocketRoute, Mount)}
    return all(type(context.original_route).matches in known for context in router.effective_route_contexts())


def _remembering_misses(matches):
    from starlette.routing import Match

    misses: set[tuple] = set()

    def remembering(scope):
        key = (scope["type"], scope["path"], scope.get("root_path", ""), scope.get("method"))
        if key in misses:
            return Match.NONE, {}
        found = matches(scope)
        if found[0] == Match.NONE:
            if len(misses) >= MEMORY_SIZE:
                misses.clear()
            misses.add(key)
        return found

    remembering._remembers_misses = True
    return remembering


def check_route_misses(app) -> str | None:
    """Every included router at the top of the app answers through the memory."""
    routers = _included_routers(app)
    if not routers:
        return "MLflow's FastAPI app has no included routers at its top (FastAPI's routing changed)"
    for router in routers:
        if not getattr(router.matches, "_remembers_misses", False):
            prefix = getattr(router.include_context, "prefix", "?")
            return (f"the included router with prefix {prefix!r} matches every request afresh: it holds a route "
                    "that matches on more than path and method, or FastAPI's router changed")
    return None


PATCH = Patch(
    name="route_misses",
    without_it="every tracking API request is matched against every native FastAPI route twice "
               "(about 2% of the server's CPU per log_batch)",
    install=install_route_misses,
    check=check_route_misses,
)
