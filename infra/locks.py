"""The lock files: what each is derived from, how `make lock` derives them, and the offline check.

The requirements files are the human-edited top-level pins; each lock pins every transitive
dependency, derived from them by uv (`uv pip compile`). Three environments install from the locks
with `pip install --no-deps` (so nothing outside a lock gets in) followed by `pip check`:

* requirements-dev.lock: .venv (native stack, local trainer, tests, `make lock` itself). Its torch
  is the CPU build (torch==X+cpu, found in $TORCH_WHEELS): no CUDA libraries on the development
  machines. The two image locks take their versions from this one, so all three agree.
* services/requirements.lock: the services image (services/Dockerfile).
* trainer/requirements.lock + trainer/requirements-cuda.lock: the trainer image. The first pins
  torch==X, which is the CPU wheel when trainer/wheels/ holds one, else PyPI's Linux build; the
  second holds exactly what PyPI's build adds (its CUDA libraries, triton), installed only with it.

Every lock is resolved for CPython 3.11 on x86_64 Linux (the images' and .venv's platform).
`make lock` keeps every locked version its requirements still allow (uv prefers a lock's own pins),
so upgrading one pin moves only what must move with it.

Standard library only: `make venv` runs `check` before .venv exists.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# Where the CPU build of torch lies on this machine kind (the Makefile's TORCH_WHEELS).
DEFAULT_TORCH_WHEELS = "/opt/wheels"
CPU_LABEL = "cpu"

DEV_LOCK = "requirements-dev.lock"
SERVICES_LOCK = "services/requirements.lock"
TRAINER_LOCK = "trainer/requirements.lock"
CUDA_LOCK = "trainer/requirements-cuda.lock"


@dataclass(frozen=True)
class Lock:
    path: str
    requirements: tuple[str, ...]  # the human-edited files it is derived from (none: derived from torch)
    purpose: str


LOCKS = (
    Lock(DEV_LOCK, ("requirements-dev.txt",), ".venv: native stack, trainer, tests"),
    Lock(SERVICES_LOCK, ("services/requirements.txt",), "the services image"),
    Lock(TRAINER_LOCK, ("trainer/requirements-torch.txt", "trainer/requirements.txt"), "the trainer image"),
    Lock(CUDA_LOCK, (), "the trainer image's CUDA libraries (what PyPI's torch adds)"),
)

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)\s*(?:;.*)?$")


class LockError(Exception):
    pass


def normalize(name: str) -> str:
    """PEP 503: MarkupSafe, markupsafe and markup_safe are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> str:
    """The public version, without a local label: 2.13.0+cpu is a build of 2.13.0 (PEP 440)."""
    return version.split("+", 1)[0]


def pins_match(pinned: str, locked: str) -> bool:
    """PEP 440's `==` rule: a pin without a local label accepts any local build of that release."""
    return pinned == locked if "+" in pinned else pinned == release(locked)


def read_pins(path: Path, root: Path = REPO) -> dict[str, str]:
    """The exact pins of a requirements or lock file, following `-r` includes: name -> version."""
    return {name: version for name, (version, _) in _pins_with_sources(path, root).items()}


def _pins_with_sources(path: Path, root: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, the file that pins it).

    Top-level requirements are pins by rule (`name==version`): anything else is refused by name,
    since a range would let a lock drift from what the file says.
    """
    where = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            for name, (version, source) in _pins_with_sources(path.parent / line.split(None, 1)[1], root).items():
                if name in pins and pins[name][0] != version:
                    raise LockError(f"{source} pins {name} {version}, {pins[name][1]} pins {pins[name][0]}")
                pins[name] = (version, source)
            continue
        match = _PIN.match(line)
        if match is None:
            raise LockError(f"{where}:{number}: {line!r} is not an exact pin (name==version)")
        name, version = normalize(match.group(1)), match.group(2)
        if name in pins and pins[name][0] != version:
            raise LockError(f"{where}:{number} pins {name} {version}, {pins[name][1]} pins {pins[name][0]}")
        pins[name] = (version, where)
    return pins


def lock_problems(root: Path = REPO) -> list[str]:
    """Each way the locks no longer hold their requirements' pins, or no longer agree with each other."""
    problems = []
    locks = {lock.path: read_pins(root / lock.path, root) for lock in LOCKS}
    for lock in LOCKS:
        locked = locks[lock.path]
        for requirements in lock.requirements:
            for name, (version, source) in _pins_with_sources(root / requirements, root).items():
                if name not in locked:
                    problems.append(f"{lock.path}: {name}=={version} ({source}) is not in the lock")
                elif not pins_match(version, locked[name]):
                    problems.append(f"{lock.path}: {name} is {locked[name]}, {source} pins {version}")
    dev = locks[DEV_LOCK]
    for image_lock in (SERVICES_LOCK, TRAINER_LOCK):
        for name, version in locks[image_lock].items():
            if name not in dev:
                problems.append(f"{image_lock}: {name}=={version} is not in {DEV_LOCK}")
            elif release(version) != release(dev[name]):
                problems.append(f"{image_lock}: {name} is {version}, {DEV_LOCK} has {dev[name]}")
    for name in sorted(locks[CUDA_LOCK].keys() & locks[TRAINER_LOCK].keys()):
        problems.append(f"{CUDA_LOCK}: {name} is also in {TRAINER_LOCK}")
    return problems


def environment_problems(lock: Path, installed: dict[str, str]) -> list[str]:
    """Each locked package the environment lacks or has at another version.

    Packages the lock does not name (a linter someone added by hand, the editable project
    packages) are not reported: they change nothing the locked packages do.
    """
    problems = []
    for name, version in sorted(read_pins(lock).items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}=={version} is locked but not installed")
        elif have != version:
            problems.append(f"{name} is installed at {have}, the lock has {version}")
    return problems


def installed_versions() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


# --- make lock ------------------------------------------------------------------------------

def _uv(*args: str) -> None:
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        raise LockError(f"{uv} is missing: uv comes with requirements-dev.lock (make venv)")
    command = [str(uv), "pip", "compile", "--quiet", "--native-tls", "--python-version", PYTHON_VERSION,
               "--python-platform", PLATFORM, "--custom-compile-command", "make lock", *args]
    subprocess.run(command, cwd=REPO, check=True)


def _name_the_rest(path: str, other: str) -> None:
    """Replace uv's list of the packages it left out (a hundred names) with where they are."""
    text = (REPO / path).read_text().split("\n# The following packages were excluded from the output:")[0]
    (REPO / path).write_text(text.rstrip("\n") + f"\n\n# The rest of this resolution is pinned in {other}.\n")


def compile_locks(torch_wheels: str, upgrade: bool = False) -> None:
    """Derive every lock from its requirements, keeping each lock's pins where still allowed.

    upgrade: take the newest version the requirements allow for every package not pinned in them.
    """
    if not (REPO / torch_wheels).is_dir():
        raise LockError(f"TORCH_WHEELS={torch_wheels} is not a folder: it should hold torch's CPU wheel")
    before = {lock.path: _content_and_times(REPO / lock.path) for lock in LOCKS}
    try:
        _compile(torch_wheels, upgrade)
    finally:
        # A lock uv rewrote unchanged keeps its time, so make does not rebuild .venv for nothing.
        for path, (content, times) in before.items():
            if content is not None and _content_and_times(REPO / path)[0] == content:
                os.utime(REPO / path, ns=times)
    problems = lock_problems()
    if problems:
        raise LockError("the new locks do not agree:\n  " + "\n  ".join(problems))


def _content_and_times(path: Path) -> tuple[bytes | None, tuple[int, int]]:
    if not path.exists():
        return None, (0, 0)
    stat = path.stat()
    return path.read_bytes(), (stat.st_atime_ns, stat.st_mtime_ns)


def _compile(torch_wheels: str, upgrade: bool) -> None:
    # 1. .venv's lock, with the CPU build of torch from the local wheel folder.
    newest = ["--upgrade"] if upgrade else []
    _uv("requirements-dev.txt", "--find-links", torch_wheels, *newest, "-o", DEV_LOCK)
    dev = read_pins(REPO / DEV_LOCK)
    if not dev["torch"].endswith("+" + CPU_LABEL):
        raise LockError(f"{DEV_LOCK} got torch {dev['torch']}, not a CPU build: is torch's CPU wheel in {torch_wheels}?")
    with tempfile.TemporaryDirectory() as tmp:
        # 2. The images take .venv's versions; their torch is the release the CPU wheel is a build of.
        constraints = Path(tmp) / "dev-versions.txt"
        constraints.write_text("".join(f"{name}=={release(v)}\n" for name, v in sorted(dev.items())))
        _uv("services/requirements.txt", "-c", str(constraints), "--no-annotate", "-o", SERVICES_LOCK)
        trainer_inputs = [f for lock in LOCKS if lock.path == TRAINER_LOCK for f in lock.requirements]
        # 3. PyPI's torch brings more than the CPU build: exactly that goes to the CUDA lock...
        not_cuda = [arg for name in sorted(dev) for arg in ("--no-emit-package", name)]
        _uv(*trainer_inputs, "-c", str(constraints), *not_cuda, *newest, "-o", CUDA_LOCK)
        _name_the_rest(CUDA_LOCK, TRAINER_LOCK)
        # 4. ... and the rest, at the same CUDA versions, to the trainer lock.
        cuda = [arg for name in sorted(read_pins(REPO / CUDA_LOCK)) for arg in ("--no-emit-package", name)]
        _uv(*trainer_inputs, "-c", str(constraints), "-c", CUDA_LOCK, *cuda, "--no-annotate", "-o", TRAINER_LOCK)
        _name_the_rest(TRAINER_LOCK, CUDA_LOCK)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/locks.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_cmd = commands.add_parser("compile", help="derive every lock from its requirements (make lock)")
    compile_cmd.add_argument("--torch-wheels", default=os.environ.get("TORCH_WHEELS", DEFAULT_TORCH_WHEELS))
    compile_cmd.add_argument("--upgrade", action="store_true",
                             help="newest allowed versions of what the requirements do not pin (else keep the locked ones)")
    commands.add_parser("check", help="every lock holds its requirements' pins (offline, no resolution)")
    args = parser.parse_args(argv)
    try:
        if args.command == "compile":
            compile_locks(args.torch_wheels, args.upgrade)
            return 0
        problems = lock_problems()
    except LockError as error:
        print(f"locks: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"locks: {problem}", file=sys.stderr)
    if problems:
        print("locks: the locks do not match the requirements: run `make lock`", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
