"""Make the trainer package importable from a plain checkout (no install needed), and load the
bench script for the tests of its pure helpers."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINER_DIR = REPO / "trainer"
BENCH = REPO / "bench" / "bench.py"

try:
    import mltrainer  # noqa: F401  (installed, e.g. pip install -e trainer)
except ImportError:
    sys.path.insert(0, str(TRAINER_DIR))


@pytest.fixture(scope="session")
def bench():
    """bench/bench.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
