"""The failed-login limiter's rules, on a fake clock (mlstack.login_limiter)."""

from __future__ import annotations

import base64

from mlstack.login_limiter import LoginLimiter, Limits, basic_credentials

LIMITS = Limits(pair_limit=3, address_limit=5, window_seconds=100, failure_memory_seconds=10,
                known_good_seconds=1000, max_tracked=50)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter() -> tuple[LoginLimiter, Clock]:
    clock = Clock()
    return LoginLimiter(LIMITS, clock=clock), clock


def fail(lim: LoginLimiter, address: str, user: str, password: str) -> str:
    """One login the server rejects; returns the limiter's verdict on it."""
    decision = lim.admit(address, user, password)
    if decision.verdict == "check":
        lim.verified(decision.attempt, ok=False)
        lim.finish(decision.attempt)
    return decision.verdict


def succeed(lim: LoginLimiter, address: str, user: str, password: str) -> str:
    decision = lim.admit(address, user, password)
    if decision.attempt is not None:
        lim.verified(decision.attempt, ok=True)
        lim.finish(decision.attempt)
    return decision.verdict


def test_budget_per_address_and_user_then_429_until_the_window_passes():
    lim, clock = limiter()
    assert [fail(lim, "10.0.0.1", "admin", f"guess{i}") for i in range(5)] == ["check"] * 3 + ["limited"] * 2
    decision = lim.admit("10.0.0.1", "admin", "guess9")
    assert decision.verdict == "limited" and decision.retry_after == 100
    clock.now += 60
    assert lim.admit("10.0.0.1", "admin", "guess9").retry_after == 40
    clock.now += 40
    assert fail(lim, "10.0.0.1", "admin", "guess10") == "check"


def test_other_addresses_and_users_keep_their_own_budget():
    lim, _ = limiter()
    for i in range(3):
        fail(lim, "10.0.0.1", "admin", f"guess{i}")
    assert lim.admit("10.0.0.1", "admin", "another").verdict == "limited"
    assert lim.admit("10.0.0.2", "admin", "another").verdict == "check"  # not locked out elsewhere
    assert lim.admit("10.0.0.1", "bob", "bobs-password").verdict == "check"


def test_budget_per_address_across_users():
    lim, _ = limiter()
    verdicts = [fail(lim, "10.0.0.1", f"user{i}", "guess") for i in range(7)]
    assert verdicts == ["check"] * 5 + ["limited"] * 2


def test_a_known_good_password_gets_in_while_its_account_is_under_attack():
    lim, _ = limiter()
    assert succeed(lim, "10.0.0.1", "admin", "the-right-one") == "check"
    for i in range(10):
        fail(lim, "10.0.0.1", "admin", f"guess{i}")
    assert lim.admit("10.0.0.1", "admin", "guess99").verdict == "limited"
    assert succeed(lim, "10.0.0.1", "admin", "the-right-one") == "known_good"


def test_a_repeated_wrong_password_is_refused_from_memory_and_spends_no_budget():
    lim, clock = limiter()
    assert fail(lim, "10.0.0.1", "admin", "old-password") == "check"
    assert [fail(lim, "10.0.0.1", "admin", "old-password") for _ in range(10)] == ["known_bad"] * 10
    assert fail(lim, "10.0.0.1", "admin", "guess2") == "check"  # 2 of 3 spent, not 11
    clock.now += 11  # forgotten after failure_memory_seconds: a password set since can work
    assert lim.admit("10.0.0.1", "admin", "old-password").verdict == "check"


def test_a_password_that_stopped_working_loses_its_pass():
    lim, _ = limiter()
    succeed(lim, "10.0.0.1", "admin", "rotated-away")
    decision = lim.admit("10.0.0.1", "admin", "rotated-away")
    assert decision.verdict == "known_good"
    lim.verified(decision.attempt, ok=False)
    lim.finish(decision.attempt)
    assert lim.admit("10.0.0.1", "admin", "rotated-away").verdict == "known_bad"


def test_guesses_in_flight_count_so_a_burst_cannot_overrun_the_budget():
    lim, _ = limiter()
    decisions = [lim.admit("10.0.0.1", "admin", f"guess{i}") for i in range(20)]
    assert [d.verdict for d in decisions].count("check") == 3
    assert decisions[3].retry_after == 1  # nothing has failed yet: ask again shortly


def test_one_credential_on_many_connections_counts_once():
    lim, _ = limiter()
    decisions = [lim.admit("10.0.0.1", "trainer", "correct-password") for _ in range(8)]
    assert {d.verdict for d in decisions} == {"check"}
    for d in decisions:
        lim.verified(d.attempt, ok=True)
        lim.finish(d.attempt)
    assert lim.admit("10.0.0.1", "trainer", "guess").verdict == "check"


def test_finished_checks_free_their_place():
    lim, _ = limiter()
    first = [lim.admit("10.0.0.1", "bob", f"pw{i}") for i in range(3)]
    assert lim.admit("10.0.0.1", "bob", "pw3").verdict == "limited"
    for d in first:
        lim.verified(d.attempt, ok=True)
        lim.finish(d.attempt)
    assert lim.admit("10.0.0.1", "bob", "pw3").verdict == "check"


def test_memory_stays_bounded_under_address_spraying():
    lim, _ = limiter()
    for i in range(500):
        fail(lim, f"10.1.{i // 250}.{i % 250}", f"user{i}", "guess")
    assert len(lim._buckets) <= LIMITS.max_tracked


def test_basic_credentials_are_read_as_mlflow_reads_them():
    def header(raw: bytes, name: bytes = b"authorization", scheme: bytes = b"Basic ") -> tuple[bytes, bytes]:
        return name, scheme + base64.b64encode(raw)

    assert basic_credentials([header(b"alice:pa:ss")]) == ("alice", "pa:ss")
    assert basic_credentials([header(b"alice:pw", scheme=b"basic  ")]) == ("alice", "pw")
    assert basic_credentials([header("zoé:pässwörd".encode())]) == ("zoé", "pässwörd")  # Werkzeug: UTF-8
    assert basic_credentials([(b"authorization", b"Bearer abc")]) is None
    assert basic_credentials([]) is None
    # On /gateway/ routes MLflow takes its own header first: so must the limiter.
    both = [header(b"alice:a"), header(b"mallory:guess", name=b"X-MLflow-Authorization")]
    assert basic_credentials(both, "/gateway/mlflow/v1/chat/completions") == ("mallory", "guess")
    assert basic_credentials(both, "/api/2.0/mlflow/experiments/search") == ("alice", "a")
