"""The bench against the compose stack: the figures users of `make up` see (make bench-compose).

Brings the stack up as the compose test does (tests/compose: Docker when a daemon answers, else
podman; stand-ins for base images that cannot be pulled; a project of its own with free ports,
removed afterwards), then runs bench/bench.py against it as a teammate's client: the tracking URI
and the trainer's credentials, with the S3 API's published port for the boto3 baseline. The stack
has no S3_PUBLIC_ENDPOINT_URL, as `make up` gives by default, so "ours" moves every byte through
the MLflow server's proxy. The server's memory is that of the mlflow container's process tree.

Arguments after the options below go to bench.py (default: --cases transfer,resume,train,metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "compose"))

from engine import EngineError, start_engine  # noqa: E402
from project import compose_project, log  # noqa: E402

DEFAULT_BENCH_ARGS = ["--cases", "transfer,resume,train,metrics"]


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, help="results JSON (default bench/results/bench-compose-<timestamp>.json)")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, bench_args = parse(argv)
    out = args.output or HERE / "results" / f"bench-compose-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    run_dir = Path(tempfile.mkdtemp(prefix="mlstack-compose-bench-"))
    figures: dict[str, object] = {}
    try:
        engine = start_engine(run_dir)
    except EngineError as exc:
        print(f"bench-compose: no container engine: {exc}", file=sys.stderr)
        return 2
    try:
        with compose_project(engine, figures) as proj:
            log("make up (builds the services image)")
            started = time.monotonic()
            up = proj.make("up")
            if up.returncode != 0:
                print(f"bench-compose: make up failed (exit {up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}",
                      file=sys.stderr)
                return 1
            figures["make up, seconds"] = round(time.monotonic() - started, 1)
            mlflow_pid = proj.service_container("mlflow")["State"]["Pid"]
            env = {**proj.client_env(), "BENCH_S3_ENDPOINT": proj.s3_endpoint,
                   "BENCH_S3_KEY": proj.values["S3_ROOT_USER"], "BENCH_S3_SECRET": proj.values["S3_ROOT_PASSWORD"],
                   "BENCH_S3_BUCKET": proj.values["S3_BUCKET"]}
            cmd = [sys.executable, str(HERE / "bench.py"), "--tracking-uri", proj.tracking_uri,
                   "--mlflow-pid", str(mlflow_pid), "--output", str(out), *(bench_args or DEFAULT_BENCH_ARGS)]
            log(f"bench.py against the compose stack at {proj.tracking_uri}")
            bench = subprocess.run(cmd, cwd=REPO, env=env)
            if bench.returncode != 0:
                return bench.returncode
    finally:
        engine.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    result = json.loads(out.read_text())
    result["stack"] = f"compose ({engine.kind}), proxied artifacts (no S3_PUBLIC_ENDPOINT_URL)"
    result["compose"] = figures
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench-compose: written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
