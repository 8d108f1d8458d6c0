"""mlstack.patches.user_lookup_once: during MLflow's auth check a user is loaded once, with their
grants where the reader can, and the grants query is answered from that with MLflow's filter;
before and after it every lookup reads the store; the start-up check names what is not in place."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.server.auth.entities import User
from mlflow.server.auth.sqlalchemy_store import RoleGrantRow

from mlstack.patches import user_lookup_once as patch


@pytest.fixture
def store_lookups():
    calls = []

    def get_user(username):
        calls.append(username)
        return {"name": username, "read": len(calls)}

    return calls, patch._remembered_during_check(get_user)


def test_the_check_loads_each_user_once_and_then_the_store_is_read_again(store_lookups):
    calls, get_user = store_lookups
    seen = []
    check = patch._remembering_users(lambda: seen.extend([get_user("ann"), get_user("ann"), get_user("bob")]))
    check()
    assert calls == ["ann", "bob"] and seen[0] is seen[1]
    assert get_user("ann")["read"] == 3 and get_user("ann")["read"] == 4  # outside a check: the store each time
    check()
    assert calls == ["ann", "bob", "ann", "ann", "ann", "bob"]  # a new check remembers nothing of the last


def test_a_check_that_raises_leaves_nothing_remembered(store_lookups):
    calls, get_user = store_lookups

    def failing_check():
        get_user("ann")
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError):
        patch._remembering_users(failing_check)()
    get_user("ann")
    assert calls == ["ann", "ann"]


def test_a_lookup_that_fails_is_not_remembered():
    calls = []

    def get_user(username):
        calls.append(username)
        raise LookupError(username)

    remembered = patch._remembered_during_check(get_user)

    def check():
        for _ in range(2):
            with pytest.raises(LookupError):
                remembered("ghost")

    patch._remembering_users(check)()
    assert calls == ["ghost", "ghost"]


def test_the_start_up_check_fails_when_mlflows_check_runs_unwrapped(monkeypatch):
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    monkeypatch.setattr(auth.store, "get_user", patch._remembered_during_check(lambda username: None), raising=False)
    monkeypatch.setattr(auth.store, "list_grants", patch._grants_from_check(auth.store.list_grants), raising=False)
    monkeypatch.setitem(flask_app.before_request_funcs, None, [auth._before_request])
    assert "runs without remembering" in patch.check_user_lookup_once(None)
    monkeypatch.setitem(flask_app.before_request_funcs, None, [])
    assert "no before-request check wrapping" in patch.check_user_lookup_once(None)
    monkeypatch.setitem(flask_app.before_request_funcs, None, [patch._remembering_users(auth._before_request)])
    assert patch.check_user_lookup_once(None) is None
    monkeypatch.setattr(auth.store, "get_user", lambda username: None, raising=False)
    assert "not the once-per-check lookup" in patch.check_user_lookup_once(None)
    monkeypatch.setattr(auth.store, "get_user", patch._remembered_during_check(lambda username: None), raising=False)
    monkeypatch.setattr(auth.store, "list_grants", lambda user_id, workspace, resource_types: [], raising=False)
    assert "does not answer from the grants" in patch.check_user_lookup_once(None)
    monkeypatch.setattr(auth.store, "list_grants", patch._grants_from_check(lambda user_id, workspace: []),
                        raising=False)
    assert "list_grants takes (user_id, workspace), not (user_id, workspace, resource_types)" in \
        patch.check_user_lookup_once(None)


GRANTS = [RoleGrantRow("experiment", "*", "READ"), RoleGrantRow("experiment", "7", "EDIT"),
          RoleGrantRow("registered_model", "m", "MANAGE"), RoleGrantRow("workspace", "*", "READ")]


@pytest.fixture
def reads():
    """A store whose user lookup and grants query record each call, and a reader of a user with
    their grants; ``None`` from the reader stands for an unknown user."""
    calls = []
    users = {"ann": User(id_=1, username="ann", password_hash="h", is_admin=False)}

    def get_user(username):
        calls.append(("get_user", username))
        if username not in users:
            raise MlflowException(f"User with username={username} not found")
        return users[username]

    def list_grants(user_id, workspace, resource_types):
        calls.append(("list_grants", user_id, workspace, tuple(sorted(resource_types))))
        return []

    def read_with_grants(username):
        calls.append(("read_with_grants", username))
        return (users[username], "default", list(GRANTS)) if username in users else None

    return calls, patch._remembered_during_check(get_user, read_with_grants), patch._grants_from_check(list_grants)


def test_in_a_check_the_grants_read_with_the_user_answer_the_grants_query(reads):
    calls, get_user, list_grants = reads
    answers = []

    def check():
        user = get_user("ann")
        answers.append(list_grants(get_user("ann").id, "default", {"experiment"}))
        answers.append(list_grants(user.id, "default", ["registered_model", "experiment"]))

    patch._remembering_users(check)()
    assert calls == [("read_with_grants", "ann")]  # one read for the user and every grants query
    # MLflow's filter: the types asked for, plus the workspace-wide grants
    assert answers[0] == [GRANTS[0], GRANTS[1], GRANTS[3]]
    assert answers[1] == GRANTS


def test_grants_of_another_user_or_workspace_and_outside_a_check_go_to_the_store(reads):
    calls, get_user, list_grants = reads

    def check():
        get_user("ann")
        assert list_grants(2, "default", {"experiment"}) == []
        assert list_grants(1, "team-a", {"experiment"}) == []

    patch._remembering_users(check)()
    assert list_grants(1, "default", {"experiment"}) == []
    assert calls == [("read_with_grants", "ann"), ("list_grants", 2, "default", ("experiment",)),
                     ("list_grants", 1, "team-a", ("experiment",)), ("list_grants", 1, "default", ("experiment",))]


def test_an_unknown_user_gets_mlflows_own_error_and_an_unknown_type_mlflows_refusal(reads):
    calls, get_user, list_grants = reads

    def check():
        with pytest.raises(MlflowException, match="username=ghost not found"):
            get_user("ghost")
        get_user("ann")
        with pytest.raises(MlflowException, match="Invalid resource type 'experimnt'"):
            list_grants(1, "default", {"experimnt"})

    patch._remembering_users(check)()
    assert calls == [("read_with_grants", "ghost"), ("get_user", "ghost"), ("read_with_grants", "ann")]
