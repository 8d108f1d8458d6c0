"""A credential whose cached check has expired is checked again once, not once per request in flight.

MLflow keeps a credential it verified for ``auth_cache_ttl_seconds`` (a minute here,
mlstack.mlflow_server). When that expires, every request already in flight with the credential
misses the cache and hashes the password itself: scrypt, 95 ms of CPU and 32 MiB each on the
bench host. With 8 clients logging metrics that is a burst of hashes per worker every minute: in
one 25-s py-spy window of the server that held such a burst, the hashing was 15% of its samples;
over 95-s windows holding one expiry per worker, 2.9%, and 0.4% with this patch (bench/README.md).

Now a request that misses the cache checks the credential under a lock of its own; the requests
that miss meanwhile wait for that one check and then find the credential in MLflow's cache. A
request whose credential is in the cache takes no lock, so a password guesser hashing wrong
passwords never holds up a teammate whose credential is cached. The locks are striped
(``LOCK_STRIPES``, chosen by the credential's hash in this process), so guessed passwords cost no
memory; two credentials that share a stripe are checked one after the other. A wrong password is
not cached by MLflow and is hashed on every attempt, as before: the login limiter bounds those.
With MLflow's cache off (``auth_cache_ttl_seconds = 0``: the upgrade's trial build of the app) every
request hashes anyway, and the wrapper steps aside rather than queue them behind one another.
"""

from __future__ import annotations

import functools
import threading

from mlstack.patches.self_check import Patch

LOCK_STRIPES = 64
_locks = tuple(threading.Lock() for _ in range(LOCK_STRIPES))


def install_login_check_once() -> None:
    from mlflow.server import auth

    if _find_in_chain(auth._authenticate_cached) is None:
        auth._authenticate_cached = _checked_once(auth._authenticate_cached)


def _cached_user(auth, username: str, password: str):
    """MLflow's cached answer for the credential, looked up as MLflow does (its key, its lock)."""
    key = auth._auth_cache_key(username, password)
    with auth._USER_AUTH_CACHE_LOCK:
        return auth._USER_AUTH_CACHE.get(key)


def _checked_once(authenticate_cached):
    from mlflow.server import auth

    @functools.wraps(authenticate_cached)
    def checked_once(username: str, password: str):
        if auth._USER_AUTH_CACHE is None:  # no cache to fill: each request hashes, side by side
            return authenticate_cached(username, password)
        user = _cached_user(auth, username, password)
        if user is not None:  # MLflow's own hit, without its second key and lookup
            return user
        with _locks[hash((username, password)) % len(_locks)]:
            # The first one here hashes and fills MLflow's cache; the ones that waited read it
            return authenticate_cached(username, password)

    # Itself, not True: functools.wraps copies attributes onto wrappers of this one (the login
    # limiter's), and only this function does the checking.
    checked_once._checks_once = checked_once
    return checked_once


def _find_in_chain(function):
    """Our wrapper, where ``function`` is it or wraps it (the login limiter wraps it in turn)."""
    while function is not None:
        if getattr(function, "_checks_once", None) is function:
            return function
        function = getattr(function, "__wrapped__", None)
    return None


def check_login_check_once(app) -> str | None:
    """MLflow verifies passwords through our wrapper, and keeps the cache whose misses it orders."""
    from mlflow.server import auth

    if _find_in_chain(getattr(auth, "_authenticate_cached", None)) is None:
        return "mlflow.server.auth._authenticate_cached does not pass through the once-per-credential check"
    for name in ("_USER_AUTH_CACHE", "_USER_AUTH_CACHE_LOCK", "_auth_cache_key"):
        if not hasattr(auth, name):
            return f"mlflow.server.auth has no {name}: MLflow's credential cache changed"
    return None


PATCH = Patch(
    name="login_check_once",
    without_it="each minute, every request in flight with an expired credential hashes the password "
               "(95 ms of CPU and 32 MiB each)",
    install=install_login_check_once,
    check=check_login_check_once,
)
