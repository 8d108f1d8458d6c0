"""One compose project of the stack under a name, env file and free ports of its own.

Used by the compose test session (tests/compose/conftest.py) and by the compose bench
(bench/compose_bench.py): stand-ins for the base images that cannot be pulled, the project's env
file filled in as a user would, and a teardown that removes everything the project created
(containers, volumes, networks, the images it built), also after a failure.
MLSTACK_COMPOSE_KEEP_IMAGES=1 keeps the images for a faster next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import standins  # noqa: E402
from engine import Engine  # noqa: E402

from mlstack import settings as s  # noqa: E402
from mlstack.native.processes import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "infra/compose.seaweedfs.yml")
LB_FILE = "infra/compose.lb.yml"  # make up LB=1: replicas behind HAProxy with TLS
TORCH_WHEEL_DIRS = (Path("/opt/wheels"),)  # where this machine kind keeps the CPU torch wheel


def log(message: str) -> None:
    standins.log(message)


@dataclass
class ComposeProject:
    engine: Engine
    name: str
    env_file: Path
    values: dict[str, str]
    tag: str
    built_images: list[str] = field(default_factory=list)
    images_before: set[str] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        """The engine's environment minus every stack variable, so only the env file decides them."""
        names = set(self.values) | {v.name for v in s.ALL_VARS} | {"COMPOSE_FILE", "COMPOSE_PROFILES", "GIT_COMMIT"}
        env = {k: v for k, v in self.engine.env.items() if k not in names}
        env["COMPOSE_PROJECT_NAME"] = self.name
        return env

    def make(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        cmd = ["make", "--no-print-directory", *args, "S3=seaweedfs", f"ENV_FILE={self.env_file}"]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def compose(self, *args: str, timeout: float = 1800, check: bool = True,
                extra_files: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return self._compose([], args, timeout, check, extra_files)

    def run_once(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        """`compose ARGS` holding a `run` of a one-shot container, through infra/compose-run.sh as the
        Makefile runs them: the exit status is the container's (podman's `run --rm` reports 0)."""
        return self._compose([str(REPO / "infra" / "compose-run.sh")], args, timeout, check)

    def _compose(self, prefix: list[str], args, timeout: float, check: bool,
                 extra_files: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        cmd = [*prefix, "docker", "compose", "--env-file", str(self.env_file)]
        for f in (*COMPOSE_FILES, *extra_files):
            cmd += ["-f", f]
        proc = subprocess.run([*cmd, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def containers(self, all_: bool = False) -> list[dict]:
        """The project's containers as the engine describes them (inspect output)."""
        args = ["ps", "-q", "--filter", f"label=com.docker.compose.project={self.name}"] + (["-a"] if all_ else [])
        ids = self.engine.cli(*args).stdout.split()
        if not ids:
            return []
        return json.loads(self.engine.cli("inspect", *ids).stdout)

    def service_container(self, service: str) -> dict:
        found = [c for c in self.containers() if c["Config"]["Labels"].get("com.docker.compose.service") == service]
        assert len(found) == 1, f"expected one running {service} container, found {len(found)}"
        return found[0]

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.values['MLFLOW_PUBLISHED_PORT']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.values['S3_API_PORT']}"

    def client_env(self) -> dict[str, str]:
        """A teammate's client: the tracking URI and the trainer's credentials, nothing else."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "S3_"))}
        env.update(MLFLOW_TRACKING_URI=self.tracking_uri, MLFLOW_TRACKING_USERNAME=self.values["MLFLOW_TRAINER_USER"],
                   MLFLOW_TRACKING_PASSWORD=self.values["MLFLOW_TRAINER_PASSWORD"])
        return env

    def s3_root(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=self.values["S3_ROOT_USER"],
                            aws_secret_access_key=self.values["S3_ROOT_PASSWORD"])


def write_env_file(path: Path, tag: str) -> dict[str, str]:
    """.env.example with a fresh secret for every change-me and free ports, as a user fills it in."""
    mlflow_port, s3_port, console_port = free_port(), free_port(), free_port()
    public = f"http://localhost:{mlflow_port}"
    chosen = {
        "MLFLOW_PUBLISHED_PORT": str(mlflow_port), "S3_API_PORT": str(s3_port), "S3_CONSOLE_PORT": str(console_port),
        "MLFLOW_PUBLIC_URL": public, "S3_BACKEND": "seaweedfs", "STACK_VERSION": tag,
        "MLFLOW_CORS_ALLOWED_ORIGINS": f"{public},http://127.0.0.1:{mlflow_port}",
    }
    lines = []
    for line in (REPO / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        if not line.startswith("#") and "=" in line:
            if name in chosen:
                line = f"{name}={chosen[name]}"
            elif line.endswith("=change-me"):
                line = f"{name}={secrets.token_urlsafe(18)}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", path.read_text(), re.M))


def compose_images(project: ComposeProject) -> list[str]:
    """The images every variant the test runs names (the trainer's profile and LB=1 included)."""
    cfg = json.loads(project.compose("--profile", "trainer", "config", "--format", "json",
                                     extra_files=(LB_FILE,)).stdout)
    return [svc["image"] for svc in cfg["services"].values() if "image" in svc and "build" not in svc]


def torch_wheel() -> Path | None:
    for folder in TORCH_WHEEL_DIRS:
        found = sorted(folder.glob("torch-2.13.0+cpu-*.whl")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


@contextlib.contextmanager
def compose_project(engine: Engine, figures: dict[str, object]) -> Iterator[ComposeProject]:
    """A project with its stand-in images built and the CPU torch wheel in place, torn down after."""
    tag = f"ctest-{secrets.token_hex(3)}"
    env_file = engine.run_dir / "compose.env"
    proj = ComposeProject(engine, f"mlstack-{tag}", env_file, write_env_file(env_file, tag), tag)
    proj.images_before = engine.image_ids()
    engine.watch_health(proj.name)
    wheel_copy = None
    try:
        images = standins.base_images([REPO / "services" / "Dockerfile", REPO / "trainer" / "Dockerfile"],
                                      compose_images(proj))
        standins.check_versions(images)
        started = time.monotonic()
        proj.built_images = standins.ensure(engine, images)
        figures["stand-in images built"] = proj.built_images
        figures["stand-ins, seconds"] = round(time.monotonic() - started, 1)
        # The CPU build of the pinned torch, so the trainer image is not GBs of CUDA libraries here.
        wheel = torch_wheel()
        if engine.kind == "podman" and wheel is not None:
            wheel_copy = REPO / "trainer" / "wheels" / wheel.name
            shutil.copy(wheel, wheel_copy)
        yield proj
    finally:
        if wheel_copy is not None:
            wheel_copy.unlink(missing_ok=True)
        tear_down(proj)


def tear_down(proj: ComposeProject) -> None:
    log(f"removing project {proj.name}: containers, volumes, networks, built images")
    proj.compose("--profile", "trainer", "down", "--volumes", "--remove-orphans", "--timeout", "30",
                 check=False, timeout=300, extra_files=(LB_FILE,))
    keep = os.environ.get("MLSTACK_COMPOSE_KEEP_IMAGES") == "1"
    ours = [f"mlstack-services:{proj.tag}", f"mlstack-trainer:{proj.tag}"]
    for image in ours:
        proj.engine.cli("rmi", "-f", image, check=False)
    if not keep:
        for image in proj.built_images:
            proj.engine.cli("rmi", "-f", standins.qualified(image), check=False)
        if proj.built_images:
            proj.engine.cli("rmi", "-f", standins.BASE_IMAGE, check=False)
        # Layers our rebuilds left untagged (never an image that was there before the session).
        for image in proj.engine.image_ids(dangling=True) - proj.images_before:
            proj.engine.cli("rmi", "-f", image, check=False)
    leftover = [c["Name"] for c in proj.containers(all_=True)]
    if leftover:
        log(f"containers left behind: {leftover}")
