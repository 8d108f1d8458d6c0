"""mlstack.patches.login_check_once around MLflow's own _authenticate_cached and credential cache.

The auth store's password check is replaced by a counting stand-in (the hash itself is not what is
tested); MLflow's cache, its key and its lookup are the real ones.
"""

from __future__ import annotations

import threading

import pytest
from cachetools import TTLCache

from mlstack.patches import login_check_once
from mlstack.patches.login_check_once import check_login_check_once, install_login_check_once

GOOD = ("trainer", "right password")


class StandInStore:
    """Counts password checks; a check can be held open until the test releases it."""

    def __init__(self) -> None:
        self.checks: list[tuple[str, str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def authenticate_user(self, username: str, password: str) -> bool:
        self.checks.append((username, password))
        self.entered.set()
        assert self.hold.wait(timeout=60), "the test never released the check"
        return (username, password) == GOOD

    def get_user(self, username: str):
        return {"username": username}


@pytest.fixture
def auth(monkeypatch):
    from mlflow.server import auth

    store = StandInStore()
    monkeypatch.setattr(auth, "store", store)
    monkeypatch.setattr(auth, "_USER_AUTH_CACHE", TTLCache(maxsize=100, ttl=600))
    monkeypatch.setattr(auth, "_authenticate_cached", auth._authenticate_cached)  # restored after the test
    auth.stand_in = store
    return auth


def in_threads(function, args_list):
    results = [None] * len(args_list)

    def call(i, args):
        results[i] = function(*args)

    threads = [threading.Thread(target=call, args=(i, args)) for i, args in enumerate(args_list)]
    for t in threads:
        t.start()
    return threads, results


def test_requests_that_miss_together_check_the_credential_once(auth):
    install_login_check_once()
    auth.stand_in.hold.clear()
    threads, results = in_threads(auth._authenticate_cached, [GOOD] * 8)
    assert auth.stand_in.entered.wait(timeout=30)
    auth.stand_in.hold.set()
    for t in threads:
        t.join(timeout=30)
    assert results == [{"username": "trainer"}] * 8
    assert auth.stand_in.checks == [GOOD]


def test_without_the_patch_each_of_them_checks_it(auth):
    """What the patch is for: MLflow's own cache lets every request in flight hash the password."""
    auth.stand_in.hold.clear()
    threads, results = in_threads(auth._authenticate_cached, [GOOD] * 8)
    assert auth.stand_in.entered.wait(timeout=30)
    for _ in range(300):  # until all eight are inside the check, or it is clear they never will be
        if len(auth.stand_in.checks) == 8:
            break
        threading.Event().wait(0.01)
    auth.stand_in.hold.set()
    for t in threads:
        t.join(timeout=30)
    assert len(auth.stand_in.checks) == 8


def test_a_cached_credential_never_waits_for_a_wrong_one_being_hashed(auth, monkeypatch):
    monkeypatch.setattr(login_check_once, "_locks", (threading.Lock(),))  # one stripe: they would collide
    install_login_check_once()
    assert auth._authenticate_cached(*GOOD) == {"username": "trainer"}  # now cached
    auth.stand_in.hold.clear()
    auth.stand_in.entered.clear()
    guesser, guessed = in_threads(auth._authenticate_cached, [("trainer", "a guess")])
    assert auth.stand_in.entered.wait(timeout=30)  # the wrong password holds the only stripe now
    teammate, answered = in_threads(auth._authenticate_cached, [GOOD])
    teammate[0].join(timeout=10)  # well within the 60 s the held check waits
    assert not teammate[0].is_alive() and answered == [{"username": "trainer"}]
    auth.stand_in.hold.set()
    guesser[0].join(timeout=30)
    assert guessed == [None]


def test_wrong_passwords_are_checked_every_time(auth):
    install_login_check_once()
    for _ in range(3):
        assert auth._authenticate_cached("trainer", "a guess") is None
    assert auth.stand_in.checks == [("trainer", "a guess")] * 3


def test_installing_twice_wraps_once_and_the_login_limiter_may_wrap_it(auth):
    import functools

    install_login_check_once()
    ours = auth._authenticate_cached
    install_login_check_once()
    assert auth._authenticate_cached is ours

    @functools.wraps(ours)
    def limiter(username, password):
        return ours(username, password)

    auth._authenticate_cached = limiter
    install_login_check_once()
    assert auth._authenticate_cached is limiter
    assert check_login_check_once(None) is None


def test_the_check_fails_until_installed_and_when_mlflows_cache_moves(auth, monkeypatch):
    assert "does not pass through" in check_login_check_once(None)
    install_login_check_once()
    assert check_login_check_once(None) is None
    monkeypatch.delattr(auth, "_USER_AUTH_CACHE_LOCK")
    assert "has no _USER_AUTH_CACHE_LOCK" in check_login_check_once(None)


def test_with_mlflows_cache_off_requests_are_not_queued(auth, monkeypatch):
    """No cache to fill (the upgrade's trial build): each request hashes, side by side, as without the patch."""
    monkeypatch.setattr(auth, "_USER_AUTH_CACHE", None)
    install_login_check_once()
    assert check_login_check_once(None) is None
    auth.stand_in.hold.clear()
    threads, results = in_threads(auth._authenticate_cached, [GOOD] * 4)
    for _ in range(300):  # all four inside the check at once: none waits on a lock
        if len(auth.stand_in.checks) == 4:
            break
        threading.Event().wait(0.01)
    inside_at_once = len(auth.stand_in.checks)
    auth.stand_in.hold.set()
    for t in threads:
        t.join(timeout=30)
    assert inside_at_once == 4 and results == [{"username": "trainer"}] * 4


def test_a_wrapper_that_only_copied_our_marker_does_not_pass(auth):
    import functools

    install_login_check_once()
    ours = auth._authenticate_cached

    @functools.wraps(ours)  # copies the marker, but calls MLflow's function, not ours
    def impostor(username, password):
        return ours.__wrapped__(username, password)

    impostor.__wrapped__ = ours.__wrapped__
    auth._authenticate_cached = impostor
    assert "does not pass through" in check_login_check_once(None)
