"""The auth check's one read of a user and their grants (mlstack.patches.user_lookup_once) answers
what MLflow's own user lookup and grants query answer, on the session's PostgreSQL.

Random role set-ups in the stack's auth database (roles in the default workspace and in another,
roles without permissions, several roles per user, workspace-wide grants, users with no role and
an admin); for every user and several sets of resource types, MLflow's ``get_user`` and
``list_grants`` against ours inside a check, where ours must not call MLflow's grants query.
"""

from __future__ import annotations

import random
import uuid

import pytest
from mlflow.exceptions import MlflowException
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

from mlstack import settings as s
from mlstack.patches import user_lookup_once as patch

TYPES = ["experiment", "registered_model", "run", "prompt"]
PERMISSIONS = ["READ", "USE", "EDIT", "MANAGE"]


@pytest.fixture(scope="module")
def store(native_stack):
    store = SqlAlchemyStore()
    store.init_db(s.backend_store_uri(native_stack.env, s.MLFLOW_AUTH_DB.get(native_stack.env)))
    return store


def random_set_up(store, seed: int) -> list[str]:
    """Users (one an admin, one with no role) and roles assigned to them at random; returns the
    usernames."""
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    users = [store.create_user(f"reads-{tag}-{i}", uuid.uuid4().hex + "Aa1!", is_admin=i == 0) for i in range(5)]
    roles = []
    for i in range(6):
        # The first role is in the default workspace with at least one grant, and the first
        # user with roles has it: something to compare in every set-up.
        role = store.create_role(f"reads-{tag}-{i}", "default" if i == 0 else rng.choice(["default", f"team-{tag}"]))
        if i == 0:
            store.add_role_permission(role.id, "experiment", "*", rng.choice(PERMISSIONS))
        for _ in range(rng.randint(0, 4)):  # some roles hold no permission at all
            resource_type = rng.choice(TYPES + ["workspace"])
            pattern = "*" if resource_type in ("run", "workspace") or rng.random() < 0.4 else str(rng.randint(1, 50))
            permission = rng.choice(["USE", "MANAGE"] if resource_type == "workspace" else PERMISSIONS)
            try:
                store.add_role_permission(role.id, resource_type, pattern, permission)
            except MlflowException:
                pass  # the same (type, pattern) twice in a role: MLflow refuses it, as it should
        roles.append(role)
    store.assign_role_to_user(users[1].id, roles[0].id)
    for user in users[1:-1]:  # the last user has no role
        for role in rng.sample(roles[1:], rng.randint(1, 4)):
            store.assign_role_to_user(user.id, role.id)
    return [user.username for user in users]


def in_a_check(function):
    result = []
    patch._remembering_users(lambda: result.append(function()))()
    return result[0]


@pytest.mark.parametrize("seed", range(4))
def test_one_read_answers_what_mlflows_lookup_and_grants_query_answer(store, seed):
    usernames = random_set_up(store, seed)
    store_calls = []

    def mlflows_list_grants(user_id, workspace, resource_types):
        store_calls.append(user_id)
        return store.list_grants(user_id, workspace, resource_types)

    get_user = patch._remembered_during_check(store.get_user, patch._user_with_grants_reader(store))
    list_grants = patch._grants_from_check(mlflows_list_grants)
    type_sets = [{"experiment"}, {"run", "experiment"}, {"registered_model"}, set(TYPES)]
    compared = 0
    for username in usernames:
        theirs = store.get_user(username)
        expected = [sorted(store.list_grants(theirs.id, "default", types)) for types in type_sets]

        def ours():
            user = get_user(username)
            assert get_user(username) is user
            return user, [sorted(list_grants(user.id, "default", types)) for types in type_sets]

        user, grants = in_a_check(ours)
        assert (user.id, user.username, user.password_hash, user.is_admin) == \
            (theirs.id, theirs.username, theirs.password_hash, theirs.is_admin)
        assert grants == expected, username
        compared += sum(map(len, expected))
    assert store_calls == []  # every grants query was answered from the one read
    assert compared > 0  # the set-up granted something in the default workspace


def test_an_unknown_user_gets_mlflows_error_and_another_workspace_mlflows_query(store):
    tag = uuid.uuid4().hex[:8]
    user = store.create_user(f"reads-{tag}", uuid.uuid4().hex + "Aa1!")
    role = store.create_role(f"reads-{tag}", f"team-{tag}")
    store.add_role_permission(role.id, "experiment", "3", "EDIT")
    store.assign_role_to_user(user.id, role.id)
    get_user = patch._remembered_during_check(store.get_user, patch._user_with_grants_reader(store))
    list_grants = patch._grants_from_check(store.list_grants)
    with pytest.raises(MlflowException, match="User with username=reads-nobody not found"):
        in_a_check(lambda: get_user("reads-nobody"))

    def ours():
        get_user(user.username)
        return list_grants(user.id, f"team-{tag}", {"experiment"}), list_grants(user.id, "default", {"experiment"})

    elsewhere, default = in_a_check(ours)
    assert [tuple(grant) for grant in elsewhere] == [("experiment", "3", "EDIT")]  # MLflow's query, not the read
    assert default == []
