"""Password guessing against a running stack: what it costs the server and a legitimate user.

Reproduces the measurement of issue 12, item 5: ``--guesses`` wrong passwords for one account
(``admin`` by default), ``--concurrency`` at a time, while a legitimate user makes one
authenticated request after another. Reports how long the guessing kept the server busy (first
guess sent to last answer), how the guesses were answered (401 = hash checked, 429 = refused by
the login limiter), and the legitimate user's median and worst latency during the attack next to
its latency before it.

    .venv/bin/python bench/login_probe.py --tracking-uri http://127.0.0.1:5000 \
        --user trainer --password "$MLFLOW_TRAINER_PASSWORD"
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

PROBE_ROUTE = "/api/2.0/mlflow/experiments/search"


def timed_get(session: requests.Session, url: str, auth: tuple[str, str]) -> tuple[int, float]:
    started = time.perf_counter()
    resp = session.get(url, params={"max_results": 1}, auth=auth, timeout=120)
    return resp.status_code, time.perf_counter() - started


def legit_latencies(url: str, auth: tuple[str, str], stop: threading.Event, out: list, codes: collections.Counter):
    with requests.Session() as session:
        while not stop.is_set():
            code, seconds = timed_get(session, url, auth)
            codes[code] += 1
            out.append(seconds)


def summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"requests": 0}
    return {"requests": len(latencies), "median_s": round(statistics.median(latencies), 4),
            "worst_s": round(max(latencies), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--user", required=True, help="the legitimate user")
    parser.add_argument("--password", required=True, help="its password")
    parser.add_argument("--target", default="admin", help="the account whose password is guessed")
    parser.add_argument("--guesses", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--baseline-requests", type=int, default=20)
    args = parser.parse_args()
    url = args.tracking_uri.rstrip("/") + PROBE_ROUTE
    legit = (args.user, args.password)

    with requests.Session() as session:
        code, _ = timed_get(session, url, legit)
        if code != 200:
            raise SystemExit(f"the legitimate user gets HTTP {code} before any guessing: check --user/--password")
        baseline = [timed_get(session, url, legit)[1] for _ in range(args.baseline_requests)]

    during: list[float] = []
    legit_codes: collections.Counter = collections.Counter()
    stop = threading.Event()
    watcher = threading.Thread(target=legit_latencies, args=(url, legit, stop, during, legit_codes), daemon=True)
    watcher.start()

    guess_codes: collections.Counter = collections.Counter()
    local = threading.local()

    def guess(i: int) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        code, _ = timed_get(local.session, url, (args.target, f"wrong-guess-{i}"))
        guess_codes[code] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(guess, range(args.guesses)))
    busy = time.perf_counter() - started
    stop.set()
    watcher.join()

    print(json.dumps({
        "guesses": args.guesses, "concurrency": args.concurrency, "target": args.target,
        "server_busy_s": round(busy, 2),
        "guess_answers": {str(k): v for k, v in sorted(guess_codes.items())},
        "legit_before": summary(baseline),
        "legit_during": summary(during),
        "legit_answers_during": {str(k): v for k, v in sorted(legit_codes.items())},
    }, indent=2))


if __name__ == "__main__":
    main()
