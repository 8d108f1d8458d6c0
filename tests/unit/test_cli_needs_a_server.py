"""Without a tracking URI every mltrainer subcommand says so and writes nothing (no stray mlflow.db)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [
    ["checkpoints", "--run-id", "0123456789abcdef0123456789abcdef"],
    ["--config", str(REPO / "configs" / "tiny.yaml")],
    ["best", "--experiment", "tiny", "--metric", "eval_loss", "--mode", "min"],
])
def test_no_tracking_uri_exits_3_naming_the_variable_and_writes_nothing(tmp_path, args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-m", "mltrainer.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no tracking server: set MLFLOW_TRACKING_URI" in proc.stderr
    assert "Creating initial MLflow database tables" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
