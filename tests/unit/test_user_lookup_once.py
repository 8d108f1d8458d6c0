"""mlstack.patches.user_lookup_once: during MLflow's auth check a user is loaded once; before and
after it every lookup reads the store; the start-up check names what is not in place."""

from __future__ import annotations

import pytest

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
    monkeypatch.setitem(flask_app.before_request_funcs, None, [auth._before_request])
    assert "runs without remembering" in patch.check_user_lookup_once(None)
    monkeypatch.setitem(flask_app.before_request_funcs, None, [])
    assert "no before-request check wrapping" in patch.check_user_lookup_once(None)
    monkeypatch.setitem(flask_app.before_request_funcs, None, [patch._remembering_users(auth._before_request)])
    assert patch.check_user_lookup_once(None) is None
    monkeypatch.setattr(auth.store, "get_user", lambda username: None, raising=False)
    assert "not the once-per-check lookup" in patch.check_user_lookup_once(None)
