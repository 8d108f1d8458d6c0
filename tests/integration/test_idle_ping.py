"""Pooled connections on the session's real PostgreSQL with mlstack.patches.idle_ping: one that sat
idle is pinged and a dead one replaced before use; one used moments ago goes out unpinged, and when
the database dropped it, one statement fails and the pool starts afresh."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import create_engine, event, text

from mlstack import settings as s
from mlstack.patches import idle_ping


@pytest.fixture
def engine(native_stack):
    # As MLflow makes its engines (pre-ping on), then changed by the patch.
    engine = create_engine(s.backend_store_uri(native_stack.env), pool_pre_ping=True, pool_size=1, max_overflow=0)
    idle_ping.ping_when_idle(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def records(engine):
    checked_in = []
    event.listen(engine.pool, "checkin", lambda dbapi_connection, record: checked_in.append(record))
    return checked_in


def backend_pid(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def terminate(native_stack, pid: int) -> None:
    other = create_engine(s.backend_store_uri(native_stack.env), poolclass=sqlalchemy.pool.NullPool)
    try:
        with other.connect() as connection:
            assert connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    finally:
        other.dispose()


def test_an_idle_connection_the_database_dropped_is_replaced_before_use(native_stack, engine, records):
    first = backend_pid(engine)
    terminate(native_stack, first)
    records[-1].info[idle_ping._CHECKED_IN_AT] -= idle_ping.IDLE_BEFORE_PING_S + 1
    assert backend_pid(engine) != first  # no error: the ping found it dead and the pool connected anew


def test_a_connection_used_moments_ago_goes_out_unpinged(native_stack, engine):
    pings = []
    real_ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda dbapi_connection: pings.append(1) or real_ping(dbapi_connection)
    first = backend_pid(engine)
    assert [backend_pid(engine) for _ in range(5)] == [first] * 5
    assert pings == []


def test_when_a_recently_used_connection_was_dropped_one_statement_fails_and_the_pool_starts_afresh(
        native_stack, engine):
    first = backend_pid(engine)
    terminate(native_stack, first)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="terminat"):
        backend_pid(engine)
    assert backend_pid(engine) != first
