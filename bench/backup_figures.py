"""Backup and restore of a ~2 GB store: how long each takes and how large the backup is.

Usage: .venv/bin/python bench/backup_figures.py [--gb 2.0] [--keep]

Starts a native stack of its own (free loopback ports, temporary state directory) and fills it
through MLflow as a team would: runs with params and metric histories, each with checkpoint-sized
objects (``--big-mb`` each) and many small files, totalling ``--gb`` GB (10^9 bytes) in the
bucket. Then, each timed around the CLI a user runs (``python -m mlstack.backup``):

* ``create``: dump both databases and copy the bucket into backups/<time>/;
* ``verify``: re-read every file of the backup and compare checksums;
* ``restore``: onto a second, fresh native stack (stop MLflow, upload, load the dumps, start).

Prints a table, writes bench/results/backup-<UTC time>.json, stops both stacks and deletes them
(and the backup, unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from mlstack.native.processes import free_port
from mlstack.native.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
PORT_VARS = ("STACK_DB_PORT", "STACK_S3_PORT", "STACK_MLFLOW_PORT")
RUNS = 8
SMALL_FILES_PER_RUN = 200
SMALL_BYTES = 50_000
METRIC_STEPS = 2000


def start(state_dir: Path) -> tuple[Stack, dict[str, str]]:
    saved = {k: os.environ.pop(k, None) for k in PORT_VARS}
    os.environ.update({k: str(free_port()) for k in PORT_VARS})
    try:
        stack = Stack(state_dir)
        return stack, stack.up()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fill(env: dict[str, str], total_bytes: int, big_bytes: int) -> dict[str, int]:
    """Runs with metrics and params; their artifacts, uploaded straight to S3 with the root key
    (what the trainer's presigned transfers amount to), under each run's artifact prefix."""
    import boto3

    os.environ.update(MLFLOW_TRACKING_USERNAME=env["MLFLOW_TRAINER_USER"],
                      MLFLOW_TRACKING_PASSWORD=env["MLFLOW_TRAINER_PASSWORD"])
    client = MlflowClient(env["MLFLOW_PUBLIC_URL"])
    s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id=env["S3_ROOT_USER"],
                      aws_secret_access_key=env["S3_ROOT_PASSWORD"], region_name="us-east-1")
    experiment = client.create_experiment("backup-figures")
    block = os.urandom(big_bytes)  # objects differ by a header: no two are the same bytes
    small_total = RUNS * SMALL_FILES_PER_RUN * SMALL_BYTES
    big_count = max(1, round((total_bytes - small_total) / big_bytes))
    prefixes = []
    for _ in range(RUNS):
        run_id = client.create_run(experiment).info.run_id
        client.log_batch(run_id, params=[mlflow.entities.Param(f"p{i}", str(i)) for i in range(20)])
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(name, 1.0 / (s + 1), now, s)
                   for name in ("loss", "eval_loss") for s in range(METRIC_STEPS)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(run_id, "FINISHED")
        prefixes.append(f"artifacts/{experiment}/{run_id}/artifacts/")
    stored = objects = 0
    work = Path(tempfile.mkdtemp(prefix="backup-figures-"))
    try:
        path = work / "big.bin"
        for b in range(big_count):
            path.write_bytes(f"big-{b}".encode().ljust(64) + block[64:])
            key = f"{prefixes[b % RUNS]}checkpoints/step-{b:08d}/model.safetensors"
            s3.upload_file(str(path), env["S3_BUCKET"], key)
            stored, objects = stored + big_bytes, objects + 1
        for r, prefix in enumerate(prefixes):
            for i in range(SMALL_FILES_PER_RUN):
                s3.put_object(Bucket=env["S3_BUCKET"], Key=f"{prefix}plots/{i:04d}.png",
                              Body=f"{r}-{i}".encode().ljust(64) + block[64:SMALL_BYTES])
                stored, objects = stored + SMALL_BYTES, objects + 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"objects": objects, "bytes": stored, "runs": RUNS, "metric_rows": RUNS * 2 * METRIC_STEPS}


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in PORT_VARS}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlstack.backup", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"mlstack.backup {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="bytes in the bucket, in GB (default 2.0)")
    parser.add_argument("--big-mb", type=int, default=100, help="size of each checkpoint-sized object, MB")
    parser.add_argument("--keep", action="store_true", help="keep the backup directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="backup-figures-"))
    source_dir, target_dir, backups = root / "source", root / "target", root / "backups"
    result: dict[str, object] = {"host": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    try:
        _, env = start(source_dir)
        started = time.perf_counter()
        result["store"] = fill(env, int(args.gb * 1e9), args.big_mb * 1_000_000)
        result["fill_s"] = round(time.perf_counter() - started, 1)
        elapsed, proc = cli("create", f"--state-dir={source_dir}", "--env-file=", f"--into={backups}")
        (backup,) = [p for p in backups.iterdir() if not p.name.startswith(".")]
        manifest = json.loads((backup / "manifest.json").read_text())
        result["backup"] = {"seconds": round(elapsed, 1), "size_bytes": du(backup),
                            "dump_bytes": {k: v["size"] for k, v in manifest["databases"].items()},
                            "steps_s": manifest["timings_seconds"]}
        elapsed, _ = cli("verify", str(backup))
        result["verify_s"] = round(elapsed, 1)
        Stack(source_dir).down()
        _, target_env = start(target_dir)
        elapsed, proc = cli("restore", str(backup), f"--state-dir={target_dir}", "--env-file=")
        result["restore"] = {"seconds": round(elapsed, 1), "output": proc.stdout.strip().splitlines()}
    finally:
        for d in (source_dir, target_dir):
            if (d / "stack.json").exists():
                Stack(d).down()
        if args.keep:
            print(f"backup kept under {backups}")
            shutil.rmtree(source_dir, ignore_errors=True)
            shutil.rmtree(target_dir, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"backup-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    store, backup = result["store"], result["backup"]
    print(f"store: {store['bytes'] / 1e9:.2f} GB in {store['objects']} objects, {store['runs']} runs, "
          f"{store['metric_rows']} metric rows")
    print(f"backup:  {backup['seconds']:7.1f} s   {backup['size_bytes'] / 1e9:.2f} GB on disk  steps {backup['steps_s']}")
    print(f"verify:  {result['verify_s']:7.1f} s")
    print(f"restore: {result['restore']['seconds']:7.1f} s   {result['restore']['output']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
