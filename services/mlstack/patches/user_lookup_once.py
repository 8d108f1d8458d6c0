"""MLflow's auth check reads the requesting user from the database once per request, not twice.

Its before-request check asks the auth store for the user twice: once to see whether they are an
admin, once more for their id to resolve their permissions; each call opens a database session
and loads the user. Under 8 clients logging batches those two lookups were a fifth of the server's
samples (py-spy, bench/).

While MLflow's check runs, the user it looked up is remembered and the second lookup answered
from that; the memory ends with the check, so a handler that changes a user and reads it back
still reads the database. Nothing is remembered across requests: an admin demoted or a user
deleted takes effect at the next request, as before.
"""

from __future__ import annotations

import contextvars
import functools

from mlstack.patches.self_check import Patch

# The users looked up during the auth check now running (None outside one).
_users_this_check: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mlstack_users_this_check",
                                                                                default=None)


def install_user_lookup_once(app) -> None:
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    if not getattr(auth.store.get_user, "_looks_up_once", False):
        auth.store.get_user = _remembered_during_check(auth.store.get_user)
    checks = flask_app.before_request_funcs.get(None, [])
    for index, check in enumerate(checks):
        if check is auth._before_request:
            checks[index] = _remembering_users(check)


def _remembered_during_check(get_user):
    @functools.wraps(get_user)
    def remembered(username):
        users = _users_this_check.get()
        if users is None:
            return get_user(username)
        if username not in users:
            users[username] = get_user(username)
        return users[username]

    remembered._looks_up_once = True
    return remembered


def _remembering_users(before_request):
    @functools.wraps(before_request)
    def check():
        token = _users_this_check.set({})
        try:
            return before_request()
        finally:
            _users_this_check.reset(token)

    check._remembers_users_of = before_request
    return check


def check_user_lookup_once(app) -> str | None:
    """MLflow's before-request check runs inside ours, and the auth store's user lookup is ours."""
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    if not getattr(auth.store.get_user, "_looks_up_once", False):
        return "mlflow.server.auth.store.get_user is not the once-per-check lookup"
    checks = flask_app.before_request_funcs.get(None, [])
    if auth._before_request in checks:
        return "MLflow's auth check _before_request runs without remembering the user it looked up"
    if not any(getattr(check, "_remembers_users_of", None) is auth._before_request for check in checks):
        return "MLflow's Flask app has no before-request check wrapping mlflow.server.auth._before_request"
    return None


PATCH = Patch(
    name="user_lookup_once",
    without_it="every request's auth check opens two database sessions to load the same user",
    install=install_user_lookup_once,
    check=check_user_lookup_once,
)
