"""The idle-ping patch's start-up check (mlstack.patches.idle_ping) passes on the installed
SQLAlchemy and fails when the pool's ping setting is not where the patch clears it."""

from __future__ import annotations

import pytest
from mlflow.store.db import utils

from mlstack.patches import idle_ping


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(utils, "create_sqlalchemy_engine", utils.create_sqlalchemy_engine)
    idle_ping.install_idle_ping()


def test_a_recent_connection_is_not_pinged_and_an_idle_one_is(installed):
    assert idle_ping.pings_at_checkout(0.0) == 0
    assert idle_ping.pings_at_checkout(idle_ping.IDLE_BEFORE_PING_S + 1) == 1
    assert idle_ping.check_idle_ping(None) is None


def test_the_check_fails_when_the_pool_still_pings_every_checkout(installed, monkeypatch):
    real = idle_ping.ping_when_idle

    def where_sqlalchemy_moved_the_setting(engine):
        real(engine)
        engine.pool._pre_ping = True

    monkeypatch.setattr(idle_ping, "ping_when_idle", where_sqlalchemy_moved_the_setting)
    assert "pinged 1 time(s) and an idle one 2 time(s)" in idle_ping.check_idle_ping(None)


def test_the_check_fails_when_mlflows_engine_factory_is_not_ours(monkeypatch):
    monkeypatch.setattr(utils, "create_sqlalchemy_engine", lambda db_uri: None)
    assert "not the idle-ping engine factory" in idle_ping.check_idle_ping(None)
