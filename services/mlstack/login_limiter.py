"""Bound the work failing logins can cause the server.

Every basic-auth password MLflow has not verified recently costs one PBKDF2 check (~0.2 s of a
core here). MLflow caches credentials it verified, never the ones it rejected, so a guesser sets
the pace: 100 wrong passwords for ``admin``, 20 at a time, kept the server busy 18 s and slowed a
legitimate user from 18 ms to 0.56 s median, 1.5 s worst (bench/login_probe.py).

The limiter sits in front of MLflow's auth and, per gunicorn worker:

* lets through at once any credential this worker verified in the last ``known_good_seconds``
  (MLflow still checks it: from its own cache, or with the hash), so a correct login is never
  refused or slowed, whoever attacks its account;
* answers a credential rejected in the last ``failure_memory_seconds`` with 401 without running
  the hash again: a repeated wrong password (a client retrying an old one) costs nothing;
* counts the distinct credentials it could not vouch for, per (client address, user) and per
  client address, over a sliding ``window_seconds``; once one of those budgets is spent, answers
  429 with ``Retry-After`` instead of running the hash. Credentials still being checked count too,
  so 20 guesses sent at once are refused beyond the budget instead of all reaching the hash;
  identical credentials in flight count once, so a client opening many connections with one
  correct password is not mistaken for a guesser.

Per worker, not shared: each worker holds its own counts, so with W workers an address can make
the server check at most W x ``pair_limit`` wrong passwords per user and W x ``address_limit`` in
all per window (2 workers: 10 and 40 per 5 minutes). Sharing the counts through PostgreSQL would
halve that at the price of a database round trip on every unverified login; the bound per worker
already turns an attack into a few seconds of CPU per address and 5 minutes.

What it does not bound: guessing from many addresses (each gets its own budget). A per-user
budget across addresses would bound it, but would also let anyone lock a user out of logins
from new machines; refusing correct passwords is what this module must not do. The client address
is the TCP peer unless ``MLFLOW_TRUSTED_PROXIES`` names the proxy in front (see
``mlstack.mlflow_server``): otherwise any local process could pick its address with
``X-Forwarded-For``, and so a new budget per request.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextvars
import functools
import hashlib
import hmac
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cachetools import TTLCache

from mlstack.patches.self_check import Patch


@dataclass(frozen=True)
class Limits:
    pair_limit: int = 5  # unverified credentials per (address, user) per window
    address_limit: int = 20  # unverified credentials per address, any user, per window
    window_seconds: float = 300.0
    failure_memory_seconds: float = 60.0  # as long as MLflow caches a good credential
    known_good_seconds: float = 3600.0
    max_tracked: int = 10_000  # buckets and remembered credentials: memory stays bounded


@dataclass
class _Bucket:
    failures: collections.deque = field(default_factory=collections.deque)  # times of failures
    pending: collections.Counter = field(default_factory=collections.Counter)  # digest -> requests


@dataclass(frozen=True)
class Attempt:
    """A request the limiter let through to the hash check; ``finish`` it once answered."""

    address: str
    username: str
    digest: bytes
    counted: bool  # holds a place in the budgets until finished (not for a known-good credential)


@dataclass(frozen=True)
class Decision:
    verdict: str  # "known_good" | "known_bad" | "check" | "limited"
    retry_after: int = 0
    attempt: Attempt | None = None


class LoginLimiter:
    def __init__(self, limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        # Digests are keyed by a per-process secret: no password, nor anything a guess can be
        # tested against offline, is kept in memory.
        self._key = secrets.token_bytes(32)
        self._good: TTLCache = TTLCache(limits.max_tracked, limits.known_good_seconds, timer=clock)
        self._bad: TTLCache = TTLCache(limits.max_tracked, limits.failure_memory_seconds, timer=clock)
        self._buckets: collections.OrderedDict[tuple, _Bucket] = collections.OrderedDict()

    def digest(self, username: str, password: str) -> bytes:
        return hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256).digest()

    def admit(self, address: str, username: str, password: str) -> Decision:
        digest = self.digest(username, password)
        with self._lock:
            if digest in self._good:
                # Still let it hear the verdict: a password changed since must lose its pass.
                return Decision("known_good", attempt=Attempt(address, username, digest, counted=False))
            if digest in self._bad:
                return Decision("known_bad")
            now = self._clock()
            buckets = [self._bucket(key, now) for key in self._keys(address, username)]
            retry = max((self._retry_after(b, limit, digest, now) for b, limit in
                         zip(buckets, (self.limits.pair_limit, self.limits.address_limit))), default=0)
            if retry:
                return Decision("limited", retry_after=retry)
            for bucket in buckets:
                bucket.pending[digest] += 1
            return Decision("check", attempt=Attempt(address, username, digest, counted=True))

    def verified(self, attempt: Attempt, ok: bool) -> None:
        """MLflow's verdict on the attempt's credential (from its cache or the hash)."""
        with self._lock:
            if ok:
                self._good[attempt.digest] = True
                self._bad.pop(attempt.digest, None)
                return
            self._good.pop(attempt.digest, None)
            if attempt.digest in self._bad:
                return  # the same wrong password, checked twice at once: one guess
            self._bad[attempt.digest] = True
            now = self._clock()
            for key in self._keys(attempt.address, attempt.username):
                self._bucket(key, now).failures.append(now)

    def finish(self, attempt: Attempt) -> None:
        if not attempt.counted:
            return
        with self._lock:
            for key in self._keys(attempt.address, attempt.username):
                bucket = self._buckets.get(key)
                if bucket is None:
                    continue
                bucket.pending[attempt.digest] -= 1
                if bucket.pending[attempt.digest] <= 0:
                    del bucket.pending[attempt.digest]

    # -- internals (hold the lock) -------------------------------------------------------------

    @staticmethod
    def _keys(address: str, username: str) -> tuple[tuple, tuple]:
        return ("pair", address, username), ("address", address)

    def _bucket(self, key: tuple, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            self._evict(now)
        else:
            self._buckets.move_to_end(key)
        horizon = now - self.limits.window_seconds
        while bucket.failures and bucket.failures[0] <= horizon:
            bucket.failures.popleft()
        return bucket

    def _evict(self, now: float) -> None:
        """Drop the least recently used buckets beyond ``max_tracked`` that nothing is waiting on."""
        excess = len(self._buckets) - self.limits.max_tracked
        for key in list(self._buckets):
            if excess <= 0:
                break
            if not self._buckets[key].pending:
                del self._buckets[key]
                excess -= 1

    def _retry_after(self, bucket: _Bucket, limit: int, digest: bytes, now: float) -> int:
        """0 when the bucket can take this credential, else the seconds until it can."""
        pending = len(bucket.pending) - (1 if digest in bucket.pending else 0)
        spent = len(bucket.failures) + pending
        if spent < limit:
            return 0
        if len(bucket.failures) <= spent - limit:
            return 1  # only credentials still being checked fill it: ask again in a second
        # The failure whose expiry brings the count under the limit.
        expires = bucket.failures[spent - limit] + self.limits.window_seconds
        return max(1, math.ceil(expires - now))


# -- the hook into MLflow's auth --------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("login_attempt", default=None)

UNAUTHENTICATED_TEXT = (
    "You are not authenticated. Please see "
    "https://www.mlflow.org/docs/latest/auth/index.html#authenticating-to-mlflow "
    "on how to authenticate."
)


GATEWAY_AUTH_HEADER = b"x-mlflow-authorization"  # MLflow's credentials header on /gateway/ routes


def basic_credentials(headers: list[tuple[bytes, bytes]], path: str = "") -> tuple[str, str] | None:
    """(username, password) from the header MLflow's auth reads, decoded as leniently as it is.

    Whatever either of MLflow's two parsers would check (FastAPI's, ASCII; Werkzeug's, UTF-8)
    must be counted here, or it would be a way around the limits.
    """
    found = dict((name.lower(), value) for name, value in headers if name.lower() in (b"authorization", GATEWAY_AUTH_HEADER))
    value = (found.get(GATEWAY_AUTH_HEADER) if path.startswith("/gateway/") else None) or found.get(b"authorization")
    if not value:
        return None
    scheme, _, encoded = value.decode("latin1").strip().partition(" ")
    if scheme.strip().lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(" \t"))
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin1")  # no parser of MLflow's checks it; counted all the same
    username, _, password = text.partition(":")
    return username, password


class LoginLimitMiddleware:
    """ASGI middleware, outermost: refuses before MLflow's auth runs the hash."""

    def __init__(self, app, limiter: LoginLimiter, is_unprotected: Callable[[str], bool]) -> None:
        self.app = app
        self.limiter = limiter
        self.is_unprotected = is_unprotected

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.is_unprotected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        credentials = basic_credentials(scope.get("headers", []), scope.get("path", ""))
        if credentials is None:
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown", 0))[0]
        decision = self.limiter.admit(address, *credentials)
        if decision.verdict == "known_bad":
            return await _plain(send, 401, UNAUTHENTICATED_TEXT, [(b"www-authenticate", b'Basic realm="mlflow"')])
        if decision.verdict == "limited":
            return await _plain(
                send, 429,
                f"Too many failed logins for user {credentials[0]!r} from {address}; "
                f"retry in {decision.retry_after} s.",
                [(b"retry-after", str(decision.retry_after).encode())],
            )
        token = _CURRENT.set(decision.attempt)
        try:
            await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(token)
            self.limiter.finish(decision.attempt)


async def _plain(send, status: int, text: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def install_login_limiter(app, limits: Limits = Limits()) -> LoginLimiter:
    """Put the limiter in front of ``app`` (MLflow's FastAPI app with basic auth) and let it hear
    MLflow's verdict on every credential it let through.

    MLflow's Flask and FastAPI auth paths both verify a password through
    ``mlflow.server.auth._authenticate_cached``; wrapping it tells the limiter what the server
    actually decided, not what an HTTP status suggests.
    """
    from mlflow.server import auth

    limiter = LoginLimiter(limits)
    original = auth._authenticate_cached

    @functools.wraps(original)  # keeps the chain of wrappers visible (mlstack.patches.login_check_once)
    def authenticate_cached(username: str, password: str):
        user = original(username, password)
        attempt = _CURRENT.get()
        if attempt is not None and attempt.username == username and \
                hmac.compare_digest(attempt.digest, limiter.digest(username, password)):
            limiter.verified(attempt, ok=user is not None)
        return user

    authenticate_cached._login_limiter = True
    auth._authenticate_cached = authenticate_cached
    app.add_middleware(LoginLimitMiddleware, limiter=limiter, is_unprotected=auth.is_unprotected_route)
    return limiter


# MLflow's functions that verify a basic-auth password, each through _authenticate_cached.
MLFLOW_AUTHENTICATORS = ("authenticate_request_basic_auth", "_authenticate_fastapi_request")


def check_login_limiter(app) -> str | None:
    """The limiter is in front of the app, and it hears every verdict: MLflow's authenticators
    still verify through the ``_authenticate_cached`` it wraps (else it would never learn of a
    failure and never limit anything)."""
    from mlflow.server import auth

    from mlstack.patches.app_routes import asks_for

    if LoginLimitMiddleware not in [m.cls for m in app.user_middleware]:
        return "the login limiter is not among the app's middleware"
    wrapper = getattr(auth, "_authenticate_cached", None)
    if not getattr(wrapper, "_login_limiter", False):
        return "mlflow.server.auth._authenticate_cached is not the limiter's wrapper"
    for name in MLFLOW_AUTHENTICATORS:
        function = getattr(auth, name, None)
        if function is None:
            return f"mlflow.server.auth has no {name}"
        if not asks_for(function, "_authenticate_cached", wrapper):
            return f"mlflow.server.auth.{name} no longer verifies passwords through _authenticate_cached"
    return None


PATCH = Patch(
    name="login_limiter",
    without_it="failed logins are not limited: a password guesser can keep the server's CPU busy hashing",
    install=install_login_limiter,
    check=check_login_limiter,
)
