"""Metric logging through one and two MLflow server instances (issue 17): points per second and
p99 latency with 4 and 8 clients, each layout on a fresh native stack of its own.

    .venv/bin/python bench/lb_figures.py [--duration 15] [--clients 4 8] [--kinds http mlflow]

Layouts: one instance straight (no balancer, the default stack), one instance behind HAProxy with
TLS (what the balancer and TLS cost), two instances behind HAProxy with TLS (what a second
instance brings). The load is bench/metrics_load.py (N client processes, common start, log_batch
of 100 points); the clients trust the balancer's certificate the way the stack's printed exports
tell a trainer to (MLFLOW_TRACKING_SERVER_CERT_PATH; REQUESTS_CA_BUNDLE for the bare-HTTP client).
Writes bench/results/lb-<UTC time>.json with the machine (cores, load average before and after).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from metrics_load import run_load  # noqa: E402  (bench/ is not a package)
from running_stack import environ_set, free_stack_ports  # noqa: E402

from mlstack.native.stack import Stack  # noqa: E402

LAYOUTS = (
    ("1 instance, no balancer", {"STACK_SERVERS": "1", "STACK_TLS": "off"}),
    ("1 instance behind HAProxy (TLS)", {"STACK_SERVERS": "1", "STACK_TLS": "on"}),
    ("2 instances behind HAProxy (TLS)", {"STACK_SERVERS": "2", "STACK_TLS": "on"}),
)


def measure(layout: dict[str, str], clients: list[int], kinds: list[str], duration: float) -> list[dict]:
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-lb-bench-"))
    try:
        with environ_set({**free_stack_ports(), **layout}):
            env = Stack(state_dir).up()
        cert = env.get("MLFLOW_TRACKING_SERVER_CERT_PATH", "")
        trust = {"MLFLOW_TRACKING_SERVER_CERT_PATH": cert, "REQUESTS_CA_BUNDLE": cert} if cert else {}
        rows = []
        with environ_set(trust):
            for kind in kinds:
                for n in clients:
                    time.sleep(3)  # let the previous load's last writes settle
                    r = run_load(env["MLFLOW_PUBLIC_URL"], env["MLFLOW_TRAINER_USER"], env["MLFLOW_TRAINER_PASSWORD"],
                                 clients=n, duration=duration, client=kind, experiment=f"lb-{kind}-{n}")
                    r.pop("run_ids", None)
                    r.pop("password", None)
                    rows.append(r)
                    print(f"  {kind:6} {n} clients: {r['points_per_s']} points/s, p50 {r['p50_ms']} ms, "
                          f"p99 {r['p99_ms']} ms, {r['errors']} errors", flush=True)
        return rows
    finally:
        Stack(state_dir).down()
        shutil.rmtree(state_dir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per measurement")
    p.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    p.add_argument("--kinds", nargs="+", choices=("http", "mlflow"), default=["http", "mlflow"])
    p.add_argument("--reverse", action="store_true",
                   help="layouts in the opposite order (a second pass: on a shared host, load drifts)")
    p.add_argument("--output", type=Path)
    a = p.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {"logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "load_before": os.getloadavg(),
                    "note": "2 cores shared with other workers' builds and tests while measuring"},
        "versions": {"mlflow": version("mlflow"), "haproxy": shutil.which("haproxy") and
                     os.popen("haproxy -v").readline().strip()},
        "duration_s": a.duration, "batch": 100, "layouts": [],
    }
    result["order"] = "reversed" if a.reverse else "as listed"
    for name, layout in (LAYOUTS[::-1] if a.reverse else LAYOUTS):
        print(f"{name}:", flush=True)
        result["layouts"].append({"layout": name, **layout, "runs": measure(layout, a.clients, a.kinds, a.duration)})
    result["machine"]["load_after"] = os.getloadavg()
    out = a.output or HERE / "results" / f"lb-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
