"""The lock files hold their requirements' pins, agree with each other, and .venv holds its lock.

Offline: nothing is resolved here (that is `make lock`'s job); the files are read and compared.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "infra"))

import locks  # noqa: E402

FILES = sorted({lock.path for lock in locks.LOCKS} | {r for lock in locks.LOCKS for r in lock.requirements}
               | {"services/requirements-native.txt"})


def test_every_lock_holds_its_requirements_pins():
    problems = locks.lock_problems()
    assert not problems, "\n".join(problems) + "\nrun `make lock` after editing a requirements file"


def test_the_venv_has_exactly_the_locked_versions():
    problems = locks.environment_problems(REPO / locks.DEV_LOCK, locks.installed_versions())
    assert not problems, "\n".join(problems) + f"\n{sys.prefix} is not {locks.DEV_LOCK}'s environment: make venv"


def test_the_server_side_pins_fastapi():
    """Our route patches depend on fastapi's internals: a lock without it let a new one slip in."""
    assert locks.read_pins(REPO / locks.SERVICES_LOCK)["fastapi"] == locks.read_pins(
        REPO / "services/requirements.txt")["fastapi"]


def test_the_venv_has_the_cpu_build_of_torch_and_no_cuda_libraries():
    dev = locks.read_pins(REPO / locks.DEV_LOCK)
    assert dev["torch"].endswith("+cpu")
    assert locks.read_pins(REPO / locks.CUDA_LOCK).keys().isdisjoint(dev)
    assert locks.read_pins(REPO / locks.TRAINER_LOCK)["torch"] == locks.release(dev["torch"])


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    assert locks.lock_problems(tmp_path) == []
    return tmp_path


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_a_pin_edited_without_make_lock_is_named(repo_copy: Path):
    pinned = locks.read_pins(repo_copy / "services/requirements.txt")["gunicorn"]
    _replace(repo_copy / "services/requirements.txt", f"gunicorn=={pinned}", "gunicorn==99.0.0")
    assert locks.lock_problems(repo_copy) == [
        f"{locks.DEV_LOCK}: gunicorn is {pinned}, services/requirements.txt pins 99.0.0",
        f"{locks.SERVICES_LOCK}: gunicorn is {pinned}, services/requirements.txt pins 99.0.0",
    ]


def test_two_requirements_files_pinning_one_package_differently_are_named(repo_copy: Path):
    """The trainer's MLflow client and the server share pins (mlflow, boto3, requests): one .venv."""
    pinned = locks.read_pins(repo_copy / "trainer/requirements.txt")["boto3"]
    _replace(repo_copy / "trainer/requirements.txt", f"boto3=={pinned}", "boto3==9.9.9")
    with pytest.raises(locks.LockError, match=rf"^trainer/requirements.txt pins boto3 9.9.9, "
                                              rf"services/requirements.txt pins {pinned}$"):
        locks.lock_problems(repo_copy)


def test_a_new_requirement_missing_from_the_locks_is_named(repo_copy: Path):
    with (repo_copy / "trainer/requirements.txt").open("a") as f:
        f.write("einops==0.8.1\n")
    assert locks.lock_problems(repo_copy) == [
        f"{locks.DEV_LOCK}: einops==0.8.1 (trainer/requirements.txt) is not in the lock",
        f"{locks.TRAINER_LOCK}: einops==0.8.1 (trainer/requirements.txt) is not in the lock",
    ]


def test_an_image_lock_that_drifts_from_the_venv_lock_is_named(repo_copy: Path):
    version = locks.read_pins(repo_copy / locks.SERVICES_LOCK)["starlette"]
    _replace(repo_copy / locks.SERVICES_LOCK, f"starlette=={version}\n", "starlette==0.1.0\n")
    assert locks.lock_problems(repo_copy) == [
        f"{locks.SERVICES_LOCK}: starlette is 0.1.0, {locks.DEV_LOCK} has {version}"]


def test_a_range_in_a_requirements_file_is_refused_by_file_and_line(repo_copy: Path):
    path = repo_copy / "services/requirements-native.txt"
    path.write_text(path.read_text() + "psycopg>=3\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(locks.LockError, match=rf"services/requirements-native.txt:{line}: 'psycopg>=3' is not an exact pin"):
        locks.lock_problems(repo_copy)


def test_pins_follow_pep440_for_local_builds():
    assert locks.pins_match("2.13.0", "2.13.0+cpu")
    assert not locks.pins_match("2.13.0+cpu", "2.13.0")
    assert not locks.pins_match("2.13.0", "2.13.1")


def test_an_environment_off_the_lock_is_named(tmp_path: Path):
    lock = tmp_path / "x.lock"
    lock.write_text("fastapi==0.165.0\n    # via mlflow\nstarlette==1.10.0\n")
    installed = {"fastapi": "0.166.0", "vulture": "2.16"}  # a hand-installed linter is no difference
    assert locks.environment_problems(lock, installed) == [
        "fastapi is installed at 0.166.0, the lock has 0.165.0",
        "starlette==1.10.0 is locked but not installed",
    ]
