"""MLflow's auth check reads the requesting user, and their grants, with one query per request.

Its before-request check asks the auth store for the user twice: once to see whether they are an
admin, once more for their id to resolve their permissions; then it asks for the user's role
grants in the workspace of the resource. Each call opens its own database session (BEGIN, the
query, COMMIT) and goes through the ORM. Under 8 clients logging batches the two user lookups
were a fifth of the server's samples, and after they were made one, the lookup and the grants
query were still a third (py-spy, bench/): six of a metrics request's nine statements.

While MLflow's check runs, the first lookup of a user reads the user's row and all of their role
grants in the default workspace in one statement; the second lookup is answered from it, and so
is the grants query, filtered to the resource types it asks for as MLflow's own query filters
them. The memory ends with the check, so a handler that changes a user and reads it back still
reads the database. Nothing is remembered across requests: an admin demoted, a user deleted or a
grant revoked takes effect at the next request, as before.

The grants come along only where every resource's grants live in the default workspace
(workspaces off, the stack's setting); with workspaces on, the workspace is known only later in
the check, and the grants query goes to MLflow's store as it is.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field

from mlstack.patches.self_check import Patch


@dataclass
class _CheckMemory:
    users: dict = field(default_factory=dict)  # username -> MLflow's User entity
    # (user id, workspace) -> every role grant of that user there, as MLflow's RoleGrantRow
    grants: dict = field(default_factory=dict)


# What the auth check now running has read (None outside one).
_this_check: contextvars.ContextVar[_CheckMemory | None] = contextvars.ContextVar("mlstack_auth_check_reads",
                                                                                  default=None)


def install_user_lookup_once(app) -> None:
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    if not getattr(auth.store.get_user, "_looks_up_once", False):
        auth.store.get_user = _remembered_during_check(auth.store.get_user, _user_with_grants_reader(auth.store))
    if not getattr(auth.store.list_grants, "_answers_from_check", False):
        auth.store.list_grants = _grants_from_check(auth.store.list_grants)
    checks = flask_app.before_request_funcs.get(None, [])
    for index, check in enumerate(checks):
        if check is auth._before_request:
            checks[index] = _remembering_users(check)


def _remembered_during_check(get_user, read_with_grants=None):
    """``get_user`` that, inside a check, reads each user once (with their grants, where
    ``read_with_grants`` can) and answers from that; outside a check it is ``get_user``."""

    @functools.wraps(get_user)
    def remembered(username):
        memory = _this_check.get()
        if memory is None:
            return get_user(username)
        if username not in memory.users:
            read = read_with_grants(username) if read_with_grants is not None else None
            if read is None:  # no such user (MLflow's lookup raises its own error), or no grants to read with it
                memory.users[username] = get_user(username)
            else:
                user, workspace, grants = read
                memory.users[username] = user
                memory.grants[(user.id, workspace)] = grants
        return memory.users[username]

    remembered._looks_up_once = True
    return remembered


def _grants_from_check(list_grants):
    """``list_grants`` answered from the grants read with the user during this check, with
    MLflow's own filter: the types asked for (each validated as MLflow validates them) plus the
    workspace-wide grants, which apply to every type."""
    from mlflow.server.auth.permissions import RESOURCE_TYPE_WORKSPACE, _validate_resource_type

    @functools.wraps(list_grants)
    def answered(user_id, workspace, resource_types):
        memory = _this_check.get()
        grants = None if memory is None else memory.grants.get((user_id, workspace))
        if grants is None:
            return list_grants(user_id, workspace, resource_types)
        types = set(resource_types)
        for resource_type in types:
            _validate_resource_type(resource_type)
        types.add(RESOURCE_TYPE_WORKSPACE)
        return [grant for grant in grants if grant.resource_type in types]

    answered._answers_from_check = True
    return answered


def _user_with_grants_reader(store):
    """A function that reads a user and all their role grants in the default workspace with one
    statement, returning (User, workspace, [RoleGrantRow]); None for an unknown user, or where
    grants are resolved in other workspaces than the default."""
    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.server.auth.db.models import SqlRole, SqlRolePermission, SqlUser, SqlUserRoleAssignment
    from mlflow.server.auth.entities import User
    from mlflow.server.auth.sqlalchemy_store import RoleGrantRow
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME
    from sqlalchemy import and_, bindparam, select

    users, assignments, roles, permissions = (SqlUser.__table__, SqlUserRoleAssignment.__table__,
                                              SqlRole.__table__, SqlRolePermission.__table__)
    # One row per grant, or one row of NULL grant columns for a user with none. The join
    # conditions are MLflow's list_grants filter (assignment of the user, role in the workspace).
    statement = (
        select(users.c.id, users.c.username, users.c.password_hash, users.c.is_admin,
               permissions.c.resource_type, permissions.c.resource_pattern, permissions.c.permission)
        .select_from(users
                     .outerjoin(assignments, assignments.c.user_id == users.c.id)
                     .outerjoin(roles, and_(roles.c.id == assignments.c.role_id,
                                            roles.c.workspace == bindparam("workspace")))
                     .outerjoin(permissions, permissions.c.role_id == roles.c.id))
        .where(users.c.username == bindparam("username"))
    )

    def read(username):
        if MLFLOW_ENABLE_WORKSPACES.get():
            return None
        with store.engine.connect() as connection:
            rows = connection.execute(statement, {"username": username, "workspace": DEFAULT_WORKSPACE_NAME}).all()
        if not rows:
            return None
        user_id, name, password_hash, is_admin = rows[0][:4]
        user = User(id_=user_id, username=name, password_hash=password_hash, is_admin=is_admin)
        grants = [RoleGrantRow(rtype, pattern, permission) for *_, rtype, pattern, permission in rows
                  if rtype is not None]
        return user, DEFAULT_WORKSPACE_NAME, grants

    return read


def _remembering_users(before_request):
    @functools.wraps(before_request)
    def check():
        token = _this_check.set(_CheckMemory())
        try:
            return before_request()
        finally:
            _this_check.reset(token)

    check._remembers_users_of = before_request
    return check


def check_user_lookup_once(app) -> str | None:
    """MLflow's before-request check runs inside ours; the auth store's user lookup and grants
    query are ours, and the grants query still takes what ours passes on."""
    import inspect

    from mlflow.server import app as flask_app
    from mlflow.server import auth

    if not getattr(auth.store.get_user, "_looks_up_once", False):
        return "mlflow.server.auth.store.get_user is not the once-per-check lookup"
    if not getattr(auth.store.list_grants, "_answers_from_check", False):
        return "mlflow.server.auth.store.list_grants does not answer from the grants read with the user"
    wanted = ["user_id", "workspace", "resource_types"]
    have = list(inspect.signature(inspect.unwrap(auth.store.list_grants)).parameters)
    if have != wanted:
        return f"mlflow.server.auth.store.list_grants takes ({', '.join(have)}), not ({', '.join(wanted)})"
    checks = flask_app.before_request_funcs.get(None, [])
    if auth._before_request in checks:
        return "MLflow's auth check _before_request runs without remembering the user it looked up"
    if not any(getattr(check, "_remembers_users_of", None) is auth._before_request for check in checks):
        return "MLflow's Flask app has no before-request check wrapping mlflow.server.auth._before_request"
    return None


PATCH = Patch(
    name="user_lookup_once",
    without_it="every request's auth check opens three database sessions: the same user twice, then their grants",
    install=install_user_lookup_once,
    check=check_user_lookup_once,
)
