"""A pooled database connection is pinged before use only when it has sat idle, not at every checkout.

MLflow makes every engine with ``pool_pre_ping=True``: each session first sends ``SELECT 1`` and
waits for the answer. A metrics request opens three sessions (the auth check's two user lookups
and the handler's), so three round trips more per request; under 8 clients logging batches,
py-spy found 11% of the server's samples in that ping (bench/).

A connection checked back in moments ago is as alive as its last statement showed. One that sat
in the pool longer than ``IDLE_BEFORE_PING_S`` is pinged as before, and a dead one is replaced
before the request gets it, as pre-ping did: after PostgreSQL restarts, every connection has been
idle through the outage. What changes is the connection in use within those seconds of the
database going away: the request that takes it fails (a 500, which MLflow's client retries) and
SQLAlchemy drops every connection of that pool, so the next request connects anew.
"""

from __future__ import annotations

import time

from mlstack.patches.self_check import Patch

# How long a connection may sit in the pool and still be used without a ping first.
IDLE_BEFORE_PING_S = 2.0

_CHECKED_IN_AT = "mlstack_checked_in_at"  # in each pooled connection's record.info


def install_idle_ping() -> None:
    from mlflow.store.db import utils

    real = utils.create_sqlalchemy_engine
    if getattr(real, "_idle_ping", False):
        return

    def create_sqlalchemy_engine(db_uri):
        engine = real(db_uri)
        ping_when_idle(engine)
        return engine

    create_sqlalchemy_engine._idle_ping = True
    utils.create_sqlalchemy_engine = create_sqlalchemy_engine


def ping_when_idle(engine) -> None:
    """Replace the engine's ping at every checkout with a ping after ``IDLE_BEFORE_PING_S``."""
    from sqlalchemy import event, exc

    dialect = engine.dialect

    def on_connect_or_checkin(dbapi_connection, record):
        record.info[_CHECKED_IN_AT] = time.monotonic()

    def on_checkout(dbapi_connection, record, proxy):
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is not None and time.monotonic() - checked_in_at < IDLE_BEFORE_PING_S:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as err:
            if dialect.is_disconnect(err, dbapi_connection, None):
                # The pool drops this connection and checks out another (SQLAlchemy's protocol).
                raise exc.DisconnectionError(f"a pooled database connection is gone: {err}") from err
            raise

    # SQLAlchemy keeps create_engine's pool_pre_ping here and reads it at each checkout; the check
    # below confirms the name on the installed SQLAlchemy.
    engine.pool._pre_ping = False
    event.listen(engine.pool, "connect", on_connect_or_checkin)
    event.listen(engine.pool, "checkin", on_connect_or_checkin)
    event.listen(engine.pool, "checkout", on_checkout)


def pings_at_checkout(idle_s: float) -> int:
    """How many pings two checkouts of one connection send, the second ``idle_s`` after the first
    was checked in, on an engine made as MLflow makes them (pre-ping on) and then changed here."""
    from sqlalchemy import create_engine, event

    engine = create_engine("sqlite://", pool_pre_ping=True)
    ping_when_idle(engine)
    pings, records = [], []
    real_ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda dbapi_connection: pings.append(1) or real_ping(dbapi_connection)
    event.listen(engine.pool, "checkin", lambda dbapi_connection, record: records.append(record))
    try:
        with engine.connect():
            pass
        records[0].info[_CHECKED_IN_AT] -= idle_s
        pings.clear()
        with engine.connect():
            pass
        return len(pings)
    finally:
        engine.dispose()


def check_idle_ping(app) -> str | None:
    """MLflow's engine factory is ours, and on this SQLAlchemy a recently used connection goes out
    without a ping while an idle one is pinged."""
    from mlflow.store.db import utils

    if not getattr(utils.create_sqlalchemy_engine, "_idle_ping", False):
        return "mlflow.store.db.utils.create_sqlalchemy_engine is not the idle-ping engine factory"
    recent, idle = pings_at_checkout(0.0), pings_at_checkout(IDLE_BEFORE_PING_S + 1)
    if (recent, idle) != (0, 1):
        return (f"a connection used just before was pinged {recent} time(s) and an idle one {idle} time(s), "
                "not 0 and 1: SQLAlchemy's pool no longer keeps pool_pre_ping where this patch clears it")
    return None


PATCH = Patch(
    name="idle_ping",
    without_it="every database session pings PostgreSQL before its first statement (three round trips more "
               "per metrics request)",
    install=install_idle_ping,
    check=check_idle_ping,
)
