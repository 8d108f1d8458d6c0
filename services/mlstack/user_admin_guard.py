"""Only admins see who has an account.

MLflow 3.17's auth app lets any authenticated user in a workspace list every account
(``GET /api/2.0/mlflow/users/list`` and its ``/ajax-api`` twin answer a non-admin with each
username and admin flag: "the reviewer-assignment UI needs the roster"). This stack uses neither
workspaces nor review queues, and a roster is the first thing a password guesser wants, so the
account directory is admin-only here. Probed with a non-admin account on the real server, every
other user route already refuses another user's data (``users/get``, ``users/permissions/list``
and ``users/roles/list`` answer 403 unless it is the caller's own, ``roles/*`` 403);
tests/integration/test_user_accounts.py asks every GET route of the auth app.

MLflow checks a route with the validator its ``BEFORE_REQUEST_VALIDATORS`` table maps it to and
lets admins through before any validator runs; a validator that says no makes a route admin-only.
"""

from __future__ import annotations

from mlstack.patches.self_check import Patch

ADMIN_ONLY_ROUTES = ("LIST_USERS", "AJAX_LIST_USERS")  # names in mlflow.server.auth.routes


def _admins_only() -> bool:
    return False  # admins never reach a validator


def install_user_directory_guard() -> None:
    from mlflow.server import auth
    from mlflow.server.auth import routes

    for name in ADMIN_ONLY_ROUTES:
        key = (getattr(routes, name, None), "GET")
        if key in auth.BEFORE_REQUEST_VALIDATORS:  # else: a newer MLflow moved it; the check says so
            auth.BEFORE_REQUEST_VALIDATORS[key] = _admins_only


def check_user_directory_guard(app) -> str | None:
    from mlflow.server import auth
    from mlflow.server.auth import routes

    for name in ADMIN_ONLY_ROUTES:
        route = getattr(routes, name, None)
        if route is None:
            return f"mlflow.server.auth.routes has no {name}"
        if auth.BEFORE_REQUEST_VALIDATORS.get((route, "GET")) is not _admins_only:
            return f"MLflow's auth app does not check GET {route} with the admin-only validator"
    return None


PATCH = Patch(
    name="user_admin_guard",
    without_it="any authenticated user can list every account name and admin flag",
    install=install_user_directory_guard,
    check=check_user_directory_guard,
)
