"""Password guessing against the real server (issue 12, item 5; mlstack.login_limiter).

The guesses come from 127.0.0.2 (any 127/8 address reaches the loopback server), so the budget
they spend is not the one of 127.0.0.1, which the rest of the session's tests log in from.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
import urllib3

from mlstack.login_limiter import Limits

ATTACKER = "127.0.0.2"
ROUTE = "/api/2.0/mlflow/experiments/search?max_results=1"


def get_from(address: str, url: str, auth: tuple[str, str], headers: dict | None = None) -> urllib3.BaseHTTPResponse:
    """One request on a fresh connection from ``address``: each may land on any gunicorn worker."""
    with urllib3.PoolManager(source_address=(address, 0), retries=False) as pool:
        return pool.request("GET", url, headers={**urllib3.make_headers(basic_auth=":".join(auth)), **(headers or {})},
                            timeout=120)


def create_user(native_stack, prefix: str) -> tuple[str, str]:
    name, password = f"{prefix}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    resp = requests.post(f"{native_stack.uri}/api/2.0/mlflow/users/create", json={"username": name, "password": password},
                         auth=native_stack.admin_auth, timeout=30)
    assert resp.status_code == 200, resp.text
    return name, password


def test_guessing_is_cut_off_with_429_while_correct_logins_get_in(native_stack):
    workers = int(native_stack.env["MLFLOW_WORKERS"])
    budget = workers * Limits().pair_limit  # each worker keeps its own count
    victim, victim_password = create_user(native_stack, "victim")
    bystander, bystander_password = create_user(native_stack, "bystander")
    url = native_stack.uri + ROUTE

    def guess(i: int) -> urllib3.BaseHTTPResponse:
        return get_from(ATTACKER, url, (victim, f"guess-{i}"))

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(guess, range(40)))
    # X-Forwarded-For does not buy a new budget: the server believes no proxy it was not told of.
    answers += [get_from(ATTACKER, url, (victim, f"spoofed-{i}"), {"X-Forwarded-For": f"10.0.{i}.1"})
                for i in range(10)]
    statuses = [r.status for r in answers]
    assert set(statuses) == {401, 429}, statuses
    assert statuses.count(401) <= budget  # the password hash ran at most this often, in 50 guesses
    refused = [r for r in answers if r.status == 429]
    assert all(1 <= int(r.headers["Retry-After"]) <= Limits().window_seconds for r in refused)
    assert all(r.data.decode().startswith(f"Too many failed logins for user '{victim}' from {ATTACKER};")
               for r in refused)
    assert [r.status for r in answers[40:]].count(429) >= 10 - Limits().pair_limit

    # Correct passwords still get in: another user's that the attacker's address never sent
    # before, and the victim's own from any other address, on whichever worker.
    assert [get_from(ATTACKER, url, (bystander, bystander_password)).status for _ in range(2 * workers)] == \
        [200] * 2 * workers
    assert [get_from("127.0.0.1", url, (victim, victim_password)).status for _ in range(2 * workers)] == \
        [200] * 2 * workers
