"""The compose test session: an engine and one compose project of the stack (project.py).

The project runs under its own name, env file and free ports, so a user's own `make up` stack on
the same machine is never touched, and everything it created is removed at the end, also when a
test fails.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import Engine, EngineError, start_engine  # noqa: E402
from project import ComposeProject, compose_project, log  # noqa: E402

FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    run_dir = Path(tempfile.mkdtemp(prefix="mlstack-compose-"))
    started = time.monotonic()
    try:
        eng = start_engine(run_dir)
    except EngineError as exc:
        # Never a skip: a machine that cannot run the engine fails the compose test, saying why.
        pytest.fail(f"no container engine: {exc}", pytrace=False)
    log(f"engine: {eng.kind} ({time.monotonic() - started:.1f} s)")
    yield eng
    eng.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def project(engine) -> ComposeProject:
    session_start = time.monotonic()
    try:
        with compose_project(engine, FIGURES) as proj:
            yield proj
    finally:
        FIGURES["compose test, seconds"] = round(time.monotonic() - session_start, 1)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("compose test figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
