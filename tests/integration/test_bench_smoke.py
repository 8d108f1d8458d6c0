"""`make bench` in --smoke mode against the session's stack: every case runs and reports sane numbers.

No timing assertions: the figures depend on the machine. The full benchmark is `make bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mltrainer.store import scan
from mltrainer.tracking import TAG_LATEST

from trainer_support import trainer_client

REPO = Path(__file__).resolve().parents[2]

CASES = ("train", "transfer", "resume", "metrics", "dedup")


def test_bench_smoke_reports_every_case(native_stack, tmp_path):
    creds = json.loads(Path(native_stack.env["S3_CREDENTIALS_FILE"]).read_text())
    env = native_stack.client_env()
    env.update(BENCH_S3_ENDPOINT=native_stack.env["S3_ENDPOINT_URL"], BENCH_S3_KEY=creds["access_key"],
               BENCH_S3_SECRET=creds["secret_key"], BENCH_S3_BUCKET=native_stack.bucket)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--smoke", "--tracking-uri", native_stack.uri,
         "--mlflow-pid", str(native_stack.stack.handle("mlflow").pid), "--output", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["cases"]) == set(CASES)
    for label in ("1 training", "2 transfer", "3 resume", "4 metrics", "5 dedup"):
        assert label in proc.stdout and label in result["table"]
    m = result["machine"]
    assert m["logical_cores"] >= 1 and len(m["load_before"]) == 3 and m["versions"]["mlflow"]

    train = result["cases"]["train"]
    for mode in ("none", "stock", "ours"):
        assert train["wall_s"][mode]["median"] > 0
    assert train["manifests_equal_saves"] and train["expected_saves"] == 2

    transfer = result["cases"]["transfer"]
    assert transfer["bytes"] == 20_000_000
    for kind in ("upload", "download"):
        for who in ("ours", "boto3", "local"):
            assert transfer[kind]["mb_per_s"][who]["median"] > 0
        assert transfer[kind]["ratio_ours_vs_boto3"] > 0
        cpu = transfer[kind]["cpu_s_per_gb"]
        assert cpu["ours"]["client"]["median"] > 0 and cpu["boto3"]["client"]["median"] > 0
        assert set(cpu["proxied"]) == {"client", "mlflow"}  # an external stack: only the server's process is known
    # Every byte of a proxied upload crosses the MLflow server, none of boto3's does.
    cpu_up = transfer["upload"]["cpu_s_per_gb"]
    assert cpu_up["proxied"]["mlflow"]["median"] > cpu_up["boto3"]["mlflow"]["median"]
    assert transfer["server_rss_growth_mib"]["upload"]["median"] is not None

    resume = result["cases"]["resume"]
    assert resume["resume_to_first_step_s"]["median"] > 0 and resume["boto3_download_s"]["median"] > 0
    assert resume["checkpoint_mb"] > 1

    metrics = result["cases"]["metrics"]
    assert metrics["trainer"]["stored_points_per_s"]["median"] > 0
    assert metrics["server"]["points_per_s"]["median"] > 0
    assert 0 < metrics["server"]["p50_ms"]["median"] <= metrics["server"]["p99_ms"]["median"]
    cpu = metrics["server"]["cpu_ms_per_request"]
    assert cpu["clients"]["median"] > 0 and cpu["server"]["median"] > 0
    assert cpu["postgres"]["n"] == 0  # an external stack: only the server's process is known

    dedup = result["cases"]["dedup"]
    assert dedup["checkpoints"] == 3
    assert 0 < dedup["uploaded_bytes"] <= dedup["folder_bytes"]
    assert dedup["uploaded_bytes"] + dedup["deduplicated_bytes"] == dedup["folder_bytes"]

    # The bench trains with the trainer's own checkpoint pipeline, not a copy of its wiring: like
    # every trainer run, each bench run points its latest-checkpoint tag at its newest stored one.
    with trainer_client(native_stack) as client:
        experiment = client.get_experiment_by_name("bench-training")
        runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'bench-ours'")
        assert runs
        for run in runs:
            stored = sorted(c.store_path for c in scan(client, run.info.run_id) if c.manifest is not None)
            assert run.data.tags.get(TAG_LATEST) == stored[-1]
