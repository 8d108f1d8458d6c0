"""Metric-logging load on a tracking server: N concurrent clients sending ``log_batch`` requests.

    .venv/bin/python bench/metrics_load.py --tracking-uri http://127.0.0.1:5000 --user trainer \\
        --password "$MLFLOW_TRAINER_PASSWORD" [--clients 8] [--requests 100 | --duration 20] [--batch 100] [--json out.json]

From Python::

    from metrics_load import run_load          # bench/ on sys.path
    r = run_load("http://127.0.0.1:5000", "trainer", "secret", clients=8, requests=100)
    r["points_per_s"], r["p50_ms"], r["p99_ms"], r["errors"]

Each client is its own process (a thread pool in one interpreter would measure its own GIL, not
the server), and by default logs to its own run, as N trainers would. Nothing but the batches
runs during the clock: the runs are made first, every client imports, connects and makes one
authenticated request, then all start at one time; points/s is all points stored over the time
from that start to the last client's end.
Latency is per request, as the client saw it. A request the server refuses (an HTTP error, a
connection error) counts in ``errors`` with its status; its points do not count as stored.

``--client mlflow`` (default) sends through ``MlflowClient.log_batch``, the trainer's own call;
``--client http`` posts the same JSON with a bare ``requests.Session``, which costs the client
less CPU (on a 2-core host the clients share the server's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DEFAULTS = {"clients": 8, "requests": 100, "batch": 100, "keys": 10, "client": "mlflow", "runs": "per-client",
            "start_delay": 0.2}
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# -- one client (a child process) --------------------------------------------------------------------------


def _client(a: dict) -> dict:
    """Send ``requests`` batches (or for ``duration`` seconds) to run ``run_id``; latencies in seconds."""
    uri, batch, keys, index = a["uri"].rstrip("/"), a["batch"], a["keys"], a["index"]
    if a["client"] == "mlflow":
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = a["user"], a["password"]
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)

        def send(step0: int, ts: int) -> None:
            client.log_batch(a["run_id"], metrics=[Metric(f"c{index}_m{j % keys}", float(step0 + j // keys), ts,
                                                          step0 + j // keys) for j in range(batch)])
        refused = (MlflowException, OSError)
        client.get_run(a["run_id"])  # connection and auth made before the clock starts
    else:
        import requests

        session = requests.Session()
        session.auth = (a["user"], a["password"])

        def send(step0: int, ts: int) -> None:
            body = {"run_id": a["run_id"], "metrics": [
                {"key": f"c{index}_m{j % keys}", "value": float(step0 + j // keys), "timestamp": ts,
                 "step": step0 + j // keys} for j in range(batch)]}
            r = session.post(uri + LOG_BATCH, json=body, timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        refused = (RuntimeError, OSError)
        session.get(uri + "/api/2.0/mlflow/runs/get", params={"run_id": a["run_id"]}, timeout=60).raise_for_status()

    print("ready", flush=True)  # the parent answers with the common start time once every client is ready
    start_at = float(sys.stdin.readline())
    while time.time() < start_at:
        time.sleep(0.002)
    started, cpu_started = time.time(), time.process_time()
    latencies, errors, points, i = [], [], 0, 0
    steps_per_request = batch // keys
    while (i < a["requests"]) if a["duration"] is None else (time.time() - started < a["duration"]):
        t = time.perf_counter()
        try:
            send(i * steps_per_request, int(time.time() * 1000))
            points += batch
        except refused as e:
            errors.append(str(e)[:300])
        latencies.append(time.perf_counter() - t)
        i += 1
    return {"started": started, "ended": time.time(), "latencies": latencies, "points": points, "errors": errors,
            "cpu_s": time.process_time() - cpu_started}


# -- the load -------------------------------------------------------------------------------------------------


def _make_runs(uri: str, user: str, password: str, n: int, experiment: str) -> list[str]:
    import requests

    s = requests.Session()
    s.auth = (user, password)
    base = uri.rstrip("/") + "/api/2.0/mlflow"
    r = s.get(base + "/experiments/get-by-name", params={"experiment_name": experiment}, timeout=60)
    if r.status_code == 200:
        exp_id = r.json()["experiment"]["experiment_id"]
    else:
        r = s.post(base + "/experiments/create", json={"name": experiment}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"cannot create experiment {experiment!r} on {uri} as {user!r}: HTTP {r.status_code} {r.text[:200]}")
        exp_id = r.json()["experiment_id"]
    runs = []
    for i in range(n):
        r = s.post(base + "/runs/create", json={"experiment_id": exp_id, "run_name": f"metrics-load-{i}",
                                                 "start_time": int(time.time() * 1000)}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"cannot create a run on {uri} as {user!r}: HTTP {r.status_code} {r.text[:200]}")
        runs.append(r.json()["run"]["info"]["run_id"])
    return runs


def run_load(tracking_uri: str, user: str, password: str, *, clients: int = DEFAULTS["clients"],
             requests: int | None = DEFAULTS["requests"], duration: float | None = None,
             batch: int = DEFAULTS["batch"], keys: int = DEFAULTS["keys"], client: str = DEFAULTS["client"],
             runs: str = DEFAULTS["runs"], experiment: str = "metrics-load",
             start_delay: float = DEFAULTS["start_delay"]) -> dict:
    """Run the load and return its figures (see the module docstring). ``duration`` (seconds)
    replaces ``requests`` when given; ``runs``: ``per-client`` or ``shared`` (one run for all)."""
    if client not in ("mlflow", "http"):
        raise ValueError(f"client must be 'mlflow' or 'http', not {client!r}")
    if runs not in ("per-client", "shared"):
        raise ValueError(f"runs must be 'per-client' or 'shared', not {runs!r}")
    if batch % keys:
        raise ValueError(f"batch ({batch}) must be a multiple of keys ({keys}): each request logs whole steps")
    run_ids = _make_runs(tracking_uri, user, password, clients if runs == "per-client" else 1, experiment)
    # MLflow's telemetry thread sets and deletes an environment variable at start-up while the
    # first requests read the environment (requests looks up proxies): a KeyError failed one
    # request in a few runs. A client-side race, not the server's answer: kept out of its figures.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = []
    for i in range(clients):
        payload = {"uri": tracking_uri, "user": user, "password": password, "run_id": run_ids[i % len(run_ids)],
                   "index": i, "batch": batch, "keys": keys, "requests": requests if duration is None else None,
                   "duration": duration, "client": client}
        procs.append(subprocess.Popen([sys.executable, str(HERE), "_client", json.dumps(payload)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env))
    # Every client has imported its libraries and made one authenticated request before the clock
    # starts (importing mlflow takes seconds per process when N share 2 cores).
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            p.wait()
            raise RuntimeError(f"metrics load client failed before the start:\n{p.stderr.read()[-1500:]}")
    start_at = time.time() + start_delay
    for p in procs:
        p.stdin.write(f"{start_at}\n")
        p.stdin.flush()
    results, failures = [], []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            failures.append(f"client exit {p.returncode}: {err[-1500:]}")
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if failures:
        raise RuntimeError("metrics load client(s) failed:\n" + "\n".join(failures))
    late = [r["started"] - start_at for r in results if r["started"] - start_at > 0.5]
    wall = max(r["ended"] for r in results) - start_at
    lat = sorted(x for r in results for x in r["latencies"])
    errors = [e for r in results for e in r["errors"]]
    points = sum(r["points"] for r in results)
    return {
        "tracking_uri": tracking_uri, "user": user, "clients": clients, "client": client, "runs": runs,
        "batch": batch, "keys": keys, "requests": len(lat), "points": points, "seconds": round(wall, 3),
        "points_per_s": round(points / wall, 1) if wall > 0 else None,
        "requests_per_s": round(len(lat) / wall, 1) if wall > 0 else None,
        "p50_ms": _ms(percentile(lat, 0.50)), "p90_ms": _ms(percentile(lat, 0.90)),
        "p99_ms": _ms(percentile(lat, 0.99)), "max_ms": _ms(lat[-1] if lat else None),
        "errors": len(errors), "error_samples": errors[:5],
        # The clients' own CPU per request over the clock: on a small host they share the server's cores.
        "client_cpu_ms_per_request": round(1000 * sum(r["cpu_s"] for r in results) / len(lat), 2) if lat else None,
        # A client that started late (a loaded host) shortens the real concurrency.
        "late_clients": len(late), "run_ids": run_ids,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        print(json.dumps(_client(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--user", default=os.environ.get("MLFLOW_TRACKING_USERNAME"), help="default: MLFLOW_TRACKING_USERNAME")
    p.add_argument("--password", default=os.environ.get("MLFLOW_TRACKING_PASSWORD"), help="default: MLFLOW_TRACKING_PASSWORD")
    p.add_argument("--clients", type=int, default=DEFAULTS["clients"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requests", type=int, default=DEFAULTS["requests"], help="log_batch requests per client")
    g.add_argument("--duration", type=float, help="seconds each client sends for (instead of --requests)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="metric points per request")
    p.add_argument("--keys", type=int, default=DEFAULTS["keys"], help="metric keys per client (a request = batch/keys steps)")
    p.add_argument("--client", choices=("mlflow", "http"), default=DEFAULTS["client"])
    p.add_argument("--runs", choices=("per-client", "shared"), default=DEFAULTS["runs"])
    p.add_argument("--experiment", default="metrics-load")
    p.add_argument("--start-delay", type=float, default=DEFAULTS["start_delay"],
                   help="seconds between every client being ready and the common start")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    missing = [n for n, v in (("--tracking-uri", a.tracking_uri), ("--user", a.user), ("--password", a.password)) if not v]
    if missing:
        p.error(f"missing {', '.join(missing)} (or MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD)")
    r = run_load(a.tracking_uri, a.user, a.password, clients=a.clients, requests=a.requests, duration=a.duration,
                 batch=a.batch, keys=a.keys, client=a.client, runs=a.runs, experiment=a.experiment,
                 start_delay=a.start_delay)
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    print(f"{r['clients']} clients ({r['client']}, {r['runs']} runs) x log_batch({r['batch']}): "
          f"{r['points_per_s']} points/s, {r['requests_per_s']} requests/s; latency p50 {r['p50_ms']} ms, "
          f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms; {r['errors']} errors; {r['late_clients']} late clients")
    for e in r["error_samples"]:
        print("  error:", e)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
