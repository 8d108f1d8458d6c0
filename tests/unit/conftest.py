"""Make the trainer package importable from a plain checkout (no install needed)."""

import sys
from pathlib import Path

TRAINER_DIR = Path(__file__).resolve().parents[2] / "trainer"

try:
    import mltrainer  # noqa: F401  (installed, e.g. pip install -e trainer)
except ImportError:
    sys.path.insert(0, str(TRAINER_DIR))
