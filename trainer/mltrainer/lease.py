"""Who trains a run right now: a lease the trainer keeps renewing in a run tag.

A crashed or preempted trainer leaves its run RUNNING, and resuming such a run is what
``--resume`` is for; but a run whose trainer is alive must never get a second one (both would
log every metric step and store checkpoints over each other). The run's status cannot tell the
two apart, so every trainer holds a lease on its run: the tag ``mltrainer.lease`` holds one JSON
object (owner, host, pid, when it was renewed, how long it lasts), rewritten by a background
thread :data:`RENEWALS_PER_LEASE` times per lease. A lease not renewed for ``lease_seconds`` is
taken to be dead: its trainer crashed, or lost the server for that long.

MLflow has no compare-and-set, so a claim is "read, write, wait, read back" (:meth:`LeaseKeeper.claim`):

- a claimer that reads a live lease refuses at once and names the holder;
- two claimers of one dead lease both write theirs; each waits :data:`CLAIM_SETTLE_SECONDS` and
  reads the tag back, and only the one whose write landed last sees its own lease: the other
  refuses. Both can believe they won only if one of them stalled for longer than the settle time
  between reading the dead lease and writing its own (a paused VM, a frozen process);
- a holder checks the tag before each renewal: it stops training (without touching the run's
  status) as soon as it sees another owner there. So even that double win, or a holder cut off
  from the server longer than its lease, trains twice for at most one renewal interval.

Leases are compared against this machine's clock: hosts whose clocks differ by more than a
fraction of the lease (NTP keeps them within milliseconds) could take a live lease for dead.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, TypeVar

from mltrainer.errors import EXIT_RESUME, MltrainerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_TAG = "mltrainer.lease"
DEFAULT_LEASE_SECONDS = 60  # config key tracking.lease_seconds
MIN_LEASE_SECONDS = 4
# Renewals per lease: three in a row may fail (a server restart, a slow request) before the
# holder is taken for dead.
RENEWALS_PER_LEASE = 4
# How long a claimer waits between writing its lease and reading it back: a rival claim that
# read the dead lease before ours was written has landed by then unless the rival stalled longer.
CLAIM_SETTLE_SECONDS = 2.0


class RunInUseError(MltrainerError):
    """Another process holds (or just claimed) the run's lease; the message names it."""

    exit_code = EXIT_RESUME
    label = "resume error"


@dataclass(frozen=True)
class Lease:
    owner: str  # random per process: two trainers on one host and pid namespace still differ
    host: str
    pid: int
    renewed_at: float  # unix time on the holder's clock
    lease_seconds: float  # the holder's own lease: a reader judges it by the holder's setting
    released: bool = False  # the holder ended cleanly: the run is free at once

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_tag(cls, value: str | None) -> Lease | None:
        """The lease in a tag value; ``None`` when absent or unreadable (nobody can be shown to hold it)."""
        if not value:
            return None
        try:
            data = json.loads(value)
            return cls(owner=str(data["owner"]), host=str(data["host"]), pid=int(data["pid"]),
                       renewed_at=float(data["renewed_at"]), lease_seconds=float(data["lease_seconds"]),
                       released=bool(data.get("released", False)))
        except (ValueError, TypeError, KeyError):
            logger.warning("ignoring unreadable %s tag %r", LEASE_TAG, value[:200])
            return None

    def expires_at(self) -> float:
        return self.renewed_at + self.lease_seconds

    def is_held(self, now: float) -> bool:
        # A renewal time ahead of our clock (skew) counts as fresh: refusing is the safe side.
        return not self.released and now < self.expires_at()

    def describe(self, now: float) -> str:
        """Who holds it and until when, for the message that refuses a resume."""
        age = now - self.renewed_at
        expiry = datetime.fromtimestamp(self.expires_at(), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"host {self.host}, pid {self.pid} (lease renewed {max(age, 0):.0f} s ago); if that trainer "
                f"is dead, its lease expires at {expiry}, in {max(self.expires_at() - now, 0):.0f} s: "
                f"resume then")


def holder(tags: dict[str, str], now: float, *, me: str | None = None) -> Lease | None:
    """The live lease of another process on a run with these tags, or ``None`` when it is free.

    A run without the tag (created before leases existed) is free: its trainer is gone.
    """
    lease = Lease.from_tag(tags.get(LEASE_TAG))
    if lease is None or lease.owner == me or not lease.is_held(now):
        return None
    return lease


def renewal_interval(lease_seconds: float) -> float:
    return lease_seconds / RENEWALS_PER_LEASE


def in_use_message(run_id: str, lease: Lease, now: float) -> str:
    return f"run {run_id} is being trained by another process: {lease.describe(now)}"


class LeaseKeeper:
    """Holds one run's lease for this process: claim or create it, renew it, release it.

    ``lost`` is set once another owner's lease is seen on the run; :meth:`check` raises then, and
    the trainer must stop without changing the run (it is someone else's now).
    """

    def __init__(self, client, lease_seconds: float = DEFAULT_LEASE_SECONDS, *,
                 settle_seconds: float = CLAIM_SETTLE_SECONDS, clock=time.time):
        self.client = client
        self.lease_seconds = float(lease_seconds)
        self.settle_seconds = settle_seconds
        self.owner = uuid.uuid4().hex
        self.run_id: str | None = None
        self.lost = threading.Event()
        self._taken_by: Lease | None = None
        self._previous: str | None = None  # the tag before our claim, put back by abandon()
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lease(self, *, released: bool = False) -> Lease:
        return Lease(self.owner, platform.node(), os.getpid(), self._clock(), self.lease_seconds, released)

    def initial_tags(self) -> dict[str, str]:
        """Tags for a run this process creates: it is held from its first moment."""
        return {LEASE_TAG: self.lease().to_tag()}

    def claim(self, run_id: str, while_settling: Callable[[], T] | None = None) -> T | None:
        """Take the lease of an existing run, or raise :class:`RunInUseError` naming who has it.

        ``while_settling`` is work that needs the run to be ours but can start before that is
        sure: it runs between our write and the read-back, in the settle time that was otherwise
        spent waiting, and its result is returned once the claim holds. It starts the renewal
        (:meth:`hold`), so a long download cannot let the new lease expire; without it, the caller
        holds the run itself. It must leave nothing that a rival claimer would use if the claim is lost
        (the resume downloads into a folder of its own); its error, if any, is raised once the
        claim is settled, and a lost claim raises :class:`RunInUseError` from it.
        """
        tags = self.client.get_run(run_id).data.tags
        if (live := holder(tags, self._clock(), me=self.owner)) is not None:
            raise RunInUseError(in_use_message(run_id, live, self._clock()))
        self._previous = tags.get(LEASE_TAG)
        try:
            self._write(run_id)
            refused = None
        except Exception as exc:  # noqa: BLE001 - judged by what the tag holds once things settle
            # The server inserts a tag a run does not have yet, and two inserts at once fail the
            # second (a unique violation): a rival's claim landed instead of ours.
            refused = exc
        settled_at = time.monotonic() + self.settle_seconds
        result, failed = None, None
        # Even after a write that raised: its answer may have been lost after the server stored
        # it, and the read-back, not the error, says whose claim landed.
        if while_settling is not None:
            self.hold(run_id)
            try:
                result = while_settling()
            except BaseException as exc:  # noqa: BLE001 - raised below, once we know whose run it is
                failed = exc
        time.sleep(max(0.0, settled_at - time.monotonic()))
        landed = Lease.from_tag(self.client.get_run(run_id).data.tags.get(LEASE_TAG))
        if landed is None or landed.owner != self.owner:
            self._stop_renewing()
            self.run_id = None  # nothing of ours to release
            if landed is None and refused is not None:
                raise refused
            raise RunInUseError(f"run {run_id} was claimed by another process at the same moment"
                                + (f": {landed.describe(self._clock())}" if landed else "")) from failed
        self.run_id = run_id
        if failed is not None:
            raise failed
        return result

    def hold(self, run_id: str) -> None:
        """Renew the lease of ``run_id`` (claimed or created by us) in the background until :meth:`release`."""
        self.run_id = run_id
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self.lost.is_set():
            taken = self._taken_by
            raise RunInUseError(f"run {self.run_id} was taken over by another process"
                                + (f" (host {taken.host}, pid {taken.pid})" if taken else "")
                                + ": this trainer stopped, leaving the run to it")

    def release(self) -> None:
        """Stop renewing; mark the lease released so a resume need not wait for it to expire."""
        self._stop_renewing()
        if self.run_id is None or self.lost.is_set():
            return
        try:
            if self._still_ours():
                self._write(self.run_id, released=True)
        except Exception as exc:  # noqa: BLE001 - the lease then simply expires
            logger.warning("could not release the lease of run %s (it expires in %.0f s): %s",
                           self.run_id, self.lease_seconds, exc)

    def abandon(self, run_id: str) -> None:
        """Undo a claim whose resume could not proceed: the tag is put back as it was, unless
        another process holds the run by now (its lease is left alone)."""
        self._stop_renewing()
        self.run_id = None  # nothing left to release
        try:
            current = Lease.from_tag(self.client.get_run(run_id).data.tags.get(LEASE_TAG))
            if current is not None and current.owner != self.owner:
                return
            if self._previous is None:
                self.client.delete_tag(run_id, LEASE_TAG)
            else:
                self.client.set_tag(run_id, LEASE_TAG, self._previous)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not restore the lease tag of run %s: %s", run_id, exc)

    # -- internals

    def _write(self, run_id: str, *, released: bool = False) -> None:
        self.client.set_tag(run_id, LEASE_TAG, self.lease(released=released).to_tag())

    def _still_ours(self) -> bool:
        current = Lease.from_tag(self.client.get_run(self.run_id).data.tags.get(LEASE_TAG))
        if current is not None and current.owner != self.owner:
            self._taken_by = current
            self.lost.set()
            logger.error("run %s was taken over by host %s, pid %s: stopping", self.run_id, current.host, current.pid)
            return False
        return True

    def _renew_loop(self) -> None:
        interval = renewal_interval(self.lease_seconds)
        while not self._stop.wait(interval):
            try:
                if not self._still_ours() or self._stop.is_set():
                    return
                self._write(self.run_id)
            except Exception as exc:  # noqa: BLE001 - keep trying: a server restart must not end the run
                logger.warning("could not renew the lease of run %s: %s", self.run_id, exc)

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A renewal stuck in MLflow's HTTP retries must not hold up the exit.
            self._thread.join(timeout=5)
