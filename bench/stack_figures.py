"""Figures of the native stack: start times, idle memory, artifact throughput through MLflow vs boto3.

Usage: .venv/bin/python bench/stack_figures.py [--size-mb 200] [--repeat 2] [--keep]

Starts its own native stack (embedded PostgreSQL, SeaweedFS, MLflow behind gunicorn) on free
loopback ports in a temporary state directory:

* cold start: ``Stack.up()`` on an empty state dir (initdb, schema creation, bucket, users);
* warm start: ``Stack.down()`` then ``Stack.up()`` on the same state dir;
* idle memory: RSS (and PSS) summed over the MLflow server's process tree (gunicorn master and
  workers) after the warm start, once the server has been idle a few seconds;
* throughput: one ``--size-mb`` artifact (random bytes; MB = 10^6 bytes) uploaded with
  ``mlflow.log_artifact`` and downloaded with ``mlflow.artifacts.download_artifacts`` by a client
  that has only the tracking URI and the trainer's credentials (a subprocess; the clock runs
  around the calls only), next to boto3's ``upload_file``/``download_file`` (default
  TransferConfig) straight to the same S3 server with the bucket-scoped key MLflow uses.

Prints a table, writes bench/results/stack-<date>.json, and stops the stack.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import boto3
import psutil
import requests

from host import machine, write_random
from mlstack.native.processes import free_port
from mlstack.native.stack import SERVICES, Stack

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1_000_000

CLIENT = r"""
import hashlib, json, os, shutil, sys, time
import mlflow
import mlflow.artifacts

src, repeat, work, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
expected = sys.argv[5]
assert not [k for k in os.environ if k.startswith(("AWS_", "S3_"))]
mlflow.set_experiment("stack-figures")
result = {"upload_s": [], "download_s": []}
with mlflow.start_run() as run:
    for i in range(repeat):
        t = time.perf_counter()
        mlflow.log_artifact(src, artifact_path=f"bench/{i}")
        result["upload_s"].append(time.perf_counter() - t)
for i in range(repeat):
    dst = os.path.join(work, f"mlflow-dl-{i}")
    t = time.perf_counter()
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"bench/{i}/{os.path.basename(src)}",
                                                dst_path=dst)
    result["download_s"].append(time.perf_counter() - t)
    digest = hashlib.sha256()
    with open(local, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    assert digest.hexdigest() == expected, "downloaded artifact differs"
    shutil.rmtree(dst)
result["run_id"] = run.info.run_id
result["experiment_id"] = run.info.experiment_id
with open(out, "w") as fh:
    json.dump(result, fh)
"""


def tree_memory(pid: int) -> dict:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
    return {"processes": len(procs), "rss_mib": round(rss / 2**20, 1), "pss_mib": round(pss / 2**20, 1)}


def client_env(env: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "S3_"))}
    out.update(MLFLOW_TRACKING_URI=env["MLFLOW_PUBLIC_URL"], MLFLOW_TRACKING_USERNAME=env["MLFLOW_TRAINER_USER"],
               MLFLOW_TRACKING_PASSWORD=env["MLFLOW_TRAINER_PASSWORD"])
    return out


def mbps(size: int, seconds: list[float]) -> dict:
    rates = [size / MB / s for s in seconds]
    return {"seconds": [round(s, 3) for s in seconds], "mb_per_s": [round(r, 1) for r in rates],
            "median_mb_per_s": round(statistics.median(rates), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200, help="artifact size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=2, help="transfers of each kind (median reported)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle time before reading memory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    args = parser.parse_args()

    for key in ("db", "s3", "mlflow"):
        os.environ[f"STACK_{key.upper()}_PORT"] = str(free_port())
    work = Path(tempfile.mkdtemp(prefix="mlstack-figures-"))
    state_dir = work / "state"
    stack = Stack(state_dir)
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                    "size_mb": args.size_mb, "repeat": args.repeat}
    try:
        t = time.perf_counter()
        env = stack.up()
        result["cold_start_s"] = round(time.perf_counter() - t, 2)
        result["mlflow_workers"] = int(env["MLFLOW_WORKERS"])
        print(f"cold start {result['cold_start_s']} s", flush=True)

        t = time.perf_counter()
        stack.down()
        result["stop_s"] = round(time.perf_counter() - t, 2)

        t = time.perf_counter()
        env = stack.up()
        result["warm_start_s"] = round(time.perf_counter() - t, 2)
        print(f"warm start {result['warm_start_s']} s (stop took {result['stop_s']} s)", flush=True)

        assert requests.get(f"{env['MLFLOW_PUBLIC_URL']}/health", timeout=10).status_code == 200
        time.sleep(args.idle_s)
        result["idle_memory"] = {
            service: tree_memory(stack.handle(service).pid) for service in SERVICES
        }

        size = args.size_mb * MB
        src = work / "blob.bin"
        sha = write_random(src, size)

        out = work / "client.json"
        proc = subprocess.run([sys.executable, "-c", CLIENT, str(src), str(args.repeat), str(work), str(out), sha],
                              env=client_env(env), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"MLflow client failed:\n{proc.stderr[-4000:]}")
        ours = json.loads(out.read_text())

        creds = json.loads(Path(env["S3_CREDENTIALS_FILE"]).read_text())
        s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id=creds["access_key"],
                          aws_secret_access_key=creds["secret_key"], region_name="us-east-1")
        bucket = env["S3_BUCKET"]
        up_s, down_s = [], []
        for i in range(args.repeat):
            key = f"bench-direct/{i}/blob.bin"
            t = time.perf_counter()
            s3.upload_file(str(src), bucket, key)
            up_s.append(time.perf_counter() - t)
        for i in range(args.repeat):
            dst = work / f"boto3-dl-{i}.bin"
            t = time.perf_counter()
            s3.download_file(bucket, f"bench-direct/{i}/blob.bin", str(dst))
            down_s.append(time.perf_counter() - t)
            assert dst.stat().st_size == size
            dst.unlink()
        # The MLflow uploads landed in the bucket with the exact size.
        prefix = f"artifacts/{ours['experiment_id']}/{ours['run_id']}/artifacts/bench/"
        sizes = [o["Size"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
        assert sizes == [size] * args.repeat, sizes

        result["upload"] = {"mlflow": mbps(size, ours["upload_s"]), "boto3": mbps(size, up_s)}
        result["download"] = {"mlflow": mbps(size, ours["download_s"]), "boto3": mbps(size, down_s)}
        for kind in ("upload", "download"):
            r = result[kind]
            r["ratio_mlflow_vs_boto3"] = round(r["mlflow"]["median_mb_per_s"] / r["boto3"]["median_mb_per_s"], 2)
        result["mlflow_memory_after_transfers"] = tree_memory(stack.handle("mlflow").pid)
    finally:
        t = time.perf_counter()
        stack.down()
        result["final_stop_s"] = round(time.perf_counter() - t, 2)
        if args.keep:
            print(f"state kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"stack-{datetime.now().strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten to {path}")
    return 0


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"\nNative stack figures, {r['date']}: {m['logical_cores']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
          f"Python {m['python']}, MLflow {m['versions']['mlflow']}, {r['mlflow_workers']} gunicorn workers")
    mem = r["idle_memory"]["mlflow"]
    rows = [
        ("cold start (empty state dir)", f"{r['cold_start_s']:.1f} s", "", ""),
        ("warm start (same state dir)", f"{r['warm_start_s']:.1f} s", "", ""),
        ("stop (down)", f"{r['stop_s']:.1f} s", "", ""),
        (f"idle RSS, MLflow tree ({mem['processes']} procs)", f"{mem['rss_mib']:.0f} MiB", f"PSS {mem['pss_mib']:.0f} MiB", ""),
    ]
    for kind in ("upload", "download"):
        x = r[kind]
        rows.append((f"{kind} {r['size_mb']} MB artifact", f"{x['mlflow']['median_mb_per_s']:.1f} MB/s",
                     f"{x['boto3']['median_mb_per_s']:.1f} MB/s", f"{x['ratio_mlflow_vs_boto3']:.2f}"))
    header = ("measure", "ours (MLflow)", "boto3 direct", "ours/boto3")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    others = ", ".join(f"{k} {v['rss_mib']:.0f} MiB" for k, v in r["idle_memory"].items() if k != "mlflow")
    print(f"(idle RSS of the other services: {others}; medians of {r['repeat']} transfers; MB = 10^6 bytes)")


if __name__ == "__main__":
    sys.exit(main())
