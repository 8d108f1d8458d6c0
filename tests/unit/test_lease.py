"""The run lease (mltrainer/lease.py): when a run counts as held, and how a claim is decided."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from mltrainer.lease import (LEASE_TAG, Lease, LeaseKeeper, RunInUseError, holder, in_use_message,
                             renewal_interval)

NOW = 1_800_000_000.0


def lease(**kw) -> Lease:
    fields = dict(owner="a" * 32, host="gpu-7", pid=4242, renewed_at=NOW - 10, lease_seconds=60.0)
    fields.update(kw)
    return Lease(**fields)


def test_tag_round_trip():
    original = lease(released=True)
    assert Lease.from_tag(original.to_tag()) == original


@pytest.mark.parametrize("value", [None, "", "not json", '{"owner": "x"}', '{"owner":"x","host":"h","pid":"p",'
                                   '"renewed_at":1,"lease_seconds":1}'])
def test_unreadable_or_missing_tag_is_no_lease(value):
    assert Lease.from_tag(value) is None


def test_held_until_the_lease_runs_out():
    assert lease(renewed_at=NOW - 59.9).is_held(NOW)
    assert not lease(renewed_at=NOW - 60).is_held(NOW)
    assert not lease(renewed_at=NOW - 600).is_held(NOW)


def test_renewal_ahead_of_our_clock_counts_as_held():
    assert lease(renewed_at=NOW + 30).is_held(NOW)


def test_released_lease_is_free_at_once():
    assert not lease(renewed_at=NOW, released=True).is_held(NOW)


def test_holder_judges_by_the_holders_own_lease_length():
    tags = {LEASE_TAG: lease(renewed_at=NOW - 100, lease_seconds=300).to_tag()}
    assert holder(tags, NOW) is not None
    tags = {LEASE_TAG: lease(renewed_at=NOW - 100, lease_seconds=60).to_tag()}
    assert holder(tags, NOW) is None


def test_run_without_a_lease_tag_is_free():
    # Runs created before leases existed: their trainers are long gone.
    assert holder({"mlflow.runName": "x"}, NOW) is None


def test_own_lease_is_not_a_rival():
    tags = {LEASE_TAG: lease(owner="me", renewed_at=NOW).to_tag()}
    assert holder(tags, NOW, me="me") is None
    assert holder(tags, NOW, me="someone-else") is not None


def test_message_names_the_holder_and_when_it_expires():
    text = in_use_message("run1", lease(renewed_at=NOW - 15, lease_seconds=60), NOW)
    assert "run run1 is being trained by another process" in text
    assert "host gpu-7, pid 4242" in text
    assert "renewed 15 s ago" in text
    assert "expires at 2027-01-15 08:00:45 UTC, in 45 s" in text


def test_renewed_several_times_per_lease():
    assert renewal_interval(60) == 15


class FakeRunTags:
    """The run tags of an MLflow server, last write wins, with a hook before each read."""

    def __init__(self, tags=None):
        self.tags = dict(tags or {})
        self.before_read = None
        self.writes = []

    def get_run(self, run_id):
        if self.before_read:
            self.before_read()
        return SimpleNamespace(data=SimpleNamespace(tags=dict(self.tags)))

    def set_tag(self, run_id, key, value):
        self.writes.append(value)
        self.tags[key] = value

    def delete_tag(self, run_id, key):
        self.tags.pop(key, None)


def keeper(client, clock=lambda: NOW):
    return LeaseKeeper(client, 60, settle_seconds=0, clock=clock)


def test_claim_of_a_live_lease_is_refused_without_writing():
    client = FakeRunTags({LEASE_TAG: lease(renewed_at=NOW - 5).to_tag()})
    with pytest.raises(RunInUseError, match="host gpu-7, pid 4242"):
        keeper(client).claim("run1")
    assert client.writes == []


def test_claim_of_a_dead_lease_wins():
    client = FakeRunTags({LEASE_TAG: lease(renewed_at=NOW - 61).to_tag()})
    mine = keeper(client)
    mine.claim("run1")
    assert Lease.from_tag(client.tags[LEASE_TAG]).owner == mine.owner


def test_two_claims_of_one_dead_lease_only_the_last_write_wins():
    client = FakeRunTags({LEASE_TAG: lease(renewed_at=NOW - 61).to_tag()})
    first, second = keeper(client), keeper(client)
    reads = []

    def rival_claims_during_our_settle():
        reads.append(1)
        if len(reads) == 2:  # our read-back: the rival read the dead lease before our write, writes after
            client.before_read = None
            client.set_tag("run1", LEASE_TAG, second.lease().to_tag())

    client.before_read = rival_claims_during_our_settle
    with pytest.raises(RunInUseError, match="claimed by another process at the same moment"):
        first.claim("run1")
    second.claim("run1")  # its own read-back sees its lease


def test_abandon_puts_the_previous_tag_back():
    dead = lease(renewed_at=NOW - 61).to_tag()
    client = FakeRunTags({LEASE_TAG: dead})
    mine = keeper(client)
    mine.claim("run1")
    mine.abandon("run1")
    mine.release()  # what the trainer's exit path does next must not write over it
    assert client.tags[LEASE_TAG] == dead
    assert not mine.lost.is_set()

    client = FakeRunTags()
    mine = keeper(client)
    mine.claim("run1")
    mine.abandon("run1")
    assert LEASE_TAG not in client.tags


def test_holder_that_sees_another_owner_stops_and_does_not_release():
    client = FakeRunTags()
    mine = keeper(client)
    mine.claim("run1")
    client.set_tag("run1", LEASE_TAG, lease(owner="rival", renewed_at=NOW).to_tag())
    mine.release()
    assert mine.lost.is_set()
    assert Lease.from_tag(client.tags[LEASE_TAG]).owner == "rival"
    with pytest.raises(RunInUseError, match=r"taken over by another process \(host gpu-7, pid 4242\)"):
        mine.check()


def test_release_marks_the_lease_released():
    client = FakeRunTags()
    mine = keeper(client)
    mine.claim("run1")
    mine.release()
    released = Lease.from_tag(client.tags[LEASE_TAG])
    assert released.owner == mine.owner and released.released
    assert holder(client.tags, NOW) is None


def test_renewal_thread_rewrites_the_lease_until_released():
    client = FakeRunTags()
    ticks = iter(range(1_000_000))
    mine = LeaseKeeper(client, 4, settle_seconds=0, clock=lambda: NOW + next(ticks))
    renewed = threading.Event()
    client.before_read = lambda: renewed.set() if len(client.writes) >= 3 else None
    mine.claim("run1")
    mine.hold("run1")
    assert renewed.wait(timeout=30)
    mine.release()
    times = [Lease.from_tag(v).renewed_at for v in client.writes]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert Lease.from_tag(client.writes[-1]).released


def test_claim_whose_write_was_refused_because_a_rival_inserted_first_loses():
    client = FakeRunTags()
    rival = keeper(client)

    def insert_conflict(run_id, key, value):
        client.tags[key] = rival.lease().to_tag()  # the rival's insert landed first
        raise RuntimeError("BAD_REQUEST: duplicate key value violates unique constraint")

    client.set_tag = insert_conflict
    with pytest.raises(RunInUseError, match="claimed by another process at the same moment"):
        keeper(client).claim("run1")


@pytest.fixture
def settle_clock(monkeypatch):
    """The claim's settle wait on a clock the test moves: ``now[0]`` is monotonic time, and every
    sleep the claim asks for is recorded (and passes at once)."""
    from mltrainer import lease as lease_module

    now, slept = [0.0], []
    monkeypatch.setattr(lease_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(lease_module.time, "sleep", lambda seconds: slept.append(seconds))
    return now, slept


@pytest.mark.parametrize("work_s, wait_s", [(1.5, 0.5), (3.0, 0.0)])
def test_work_while_settling_runs_after_our_write_and_the_wait_is_only_what_is_left(settle_clock, work_s, wait_s):
    now, slept = settle_clock
    client = FakeRunTags({LEASE_TAG: lease(renewed_at=NOW - 61).to_tag()})
    mine = LeaseKeeper(client, 60, settle_seconds=2.0, clock=lambda: NOW)
    seen = []

    def download():
        seen.append(Lease.from_tag(client.tags[LEASE_TAG]).owner)  # our lease is written before it runs
        now[0] += work_s
        return "checkpoint-4"

    assert mine.claim("run1", while_settling=download) == "checkpoint-4"
    assert seen == [mine.owner] and slept == [wait_s]
    assert mine.run_id == "run1"
    mine.release()


def test_work_while_settling_on_a_claim_lost_to_a_rival_is_discarded(settle_clock):
    client = FakeRunTags({LEASE_TAG: lease(renewed_at=NOW - 61).to_tag()})
    mine, rival = (LeaseKeeper(client, 60, settle_seconds=2.0, clock=lambda: NOW) for _ in range(2))

    def download():  # the rival read the dead lease before our write and writes after it
        client.set_tag("run1", LEASE_TAG, rival.lease().to_tag())
        return "checkpoint-4"

    with pytest.raises(RunInUseError, match="claimed by another process at the same moment"):
        mine.claim("run1", while_settling=download)
    assert mine.run_id is None
    writes = len(client.writes)
    mine.release()  # what the trainer's exit path does: nothing to release, the rival's lease stays
    mine.abandon("run1")
    assert len(client.writes) == writes and Lease.from_tag(client.tags[LEASE_TAG]).owner == rival.owner


def test_work_while_settling_that_fails_raises_its_error_once_the_claim_is_settled(settle_clock):
    client = FakeRunTags()
    mine = LeaseKeeper(client, 60, settle_seconds=2.0, clock=lambda: NOW)

    def download():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mine.claim("run1", while_settling=download)
    assert mine.run_id == "run1"  # held: the caller abandons it, and the tag goes back to none
    mine.abandon("run1")
    assert LEASE_TAG not in client.tags

    client = FakeRunTags()
    mine, rival = (LeaseKeeper(client, 60, settle_seconds=2.0, clock=lambda: NOW) for _ in range(2))

    def download_then_lose():
        client.set_tag("run1", LEASE_TAG, rival.lease().to_tag())
        raise OSError("disk full")

    with pytest.raises(RunInUseError) as lost:
        mine.claim("run1", while_settling=download_then_lose)
    assert isinstance(lost.value.__cause__, OSError) and mine.run_id is None


def test_work_while_settling_runs_when_our_write_errored_but_landed(settle_clock):
    """A write whose answer was lost (a timeout after the server stored it) is still our claim:
    the work must have run, or the resume would have no checkpoint to start from."""
    client = FakeRunTags()
    mine = LeaseKeeper(client, 60, settle_seconds=2.0, clock=lambda: NOW)

    def stored_then_timed_out(run_id, key, value):
        client.tags[key] = value
        raise TimeoutError("read timed out")

    client.set_tag = stored_then_timed_out
    assert mine.claim("run1", while_settling=lambda: "checkpoint-4") == "checkpoint-4"
    assert mine.run_id == "run1"
    mine._stop_renewing()
