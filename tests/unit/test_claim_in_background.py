"""ClaimInBackground: the resume's claim and download on a thread, the model built meanwhile."""

import threading

import pytest

from mltrainer import resume
from mltrainer.lease import RunInUseError


class Point:
    run_id = "r1"


class Lease:
    def __init__(self):
        self.abandoned = []

    def abandon(self, run_id):
        self.abandoned.append(run_id)


def claiming(monkeypatch, outcome, gate=None):
    def claim_and_fetch(plan, lease):
        if gate is not None:
            gate.wait(5)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(resume, "claim_and_fetch", claim_and_fetch)
    lease = Lease()
    return resume.ClaimInBackground(object(), lease), lease


def test_the_point_comes_back_in_the_callers_thread(monkeypatch):
    point = Point()
    claim, lease = claiming(monkeypatch, point)
    assert claim.result() is point and lease.abandoned == []


def test_a_lost_claim_is_raised_in_the_callers_thread_and_nothing_is_undone(monkeypatch):
    claim, lease = claiming(monkeypatch, RunInUseError("run r1 was claimed by another process at the same moment"))
    with pytest.raises(RunInUseError, match="at the same moment"):
        claim.result()
    claim.undo()
    assert lease.abandoned == []  # claim_and_fetch gives back what it claimed itself


def test_undo_waits_for_a_claim_still_running_then_gives_the_run_back(monkeypatch):
    gate = threading.Event()
    claim, lease = claiming(monkeypatch, Point(), gate)
    threading.Timer(0.2, gate.set).start()
    claim.undo()  # the model's building failed while the claim was still settling
    assert lease.abandoned == ["r1"]


def test_once_the_run_is_handed_out_a_later_failure_does_not_give_it_back(monkeypatch):
    claim, lease = claiming(monkeypatch, Point())
    claim.result()
    claim.undo()  # training failed after it had the run: the run is released, not abandoned
    assert lease.abandoned == []
