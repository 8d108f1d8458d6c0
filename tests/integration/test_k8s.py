"""The Kubernetes manifests (infra/k8s) rendered by kubectl's kustomize and checked offline.

No cluster runs on our machines: every rendered object is validated against the Kubernetes API
schemas (kubernetes-validate, strict: an unknown field is an error), and the containers are held
to compose and the native launcher: the same entrypoints with the same variable names
(stack_contract, the readers test_compose uses too). kubectl is Debian's kubernetes-client (1.20,
kustomize v2.0.3) on a clean machine, so the kustomization keeps to what that version renders.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from mlstack import settings as s
from mlstack.native.stack import Stack
from stack_contract import (LEAKED, REPO, compose_config, declared_names, native_environment,
                            native_service_environment, server_tasks, stack_variable_names, write_filled_env_file)
from system_packages import ensure_programs

K8S_DIR = REPO / "infra" / "k8s"
SECRETS_EXAMPLE = K8S_DIR / "secrets.example"
README = REPO / "README.md"
# The oldest and the newest Kubernetes kubernetes-validate carries schemas for: a field one of them
# lacks (added later, or removed since) fails there. Both ends take about a second, all thirteen
# versions seven. (batch/v1 CronJob and policy/v1 PodDisruptionBudget need 1.21 at least.)
OLDEST_KUBERNETES = "1.25"
KUBERNETES_VERSIONS = [OLDEST_KUBERNETES, kv_utils.major_minor(kv_utils.latest_version())]

# Each workload of the manifests, and what it runs in compose: a service, or a Makefile target
# that runs a module in a service's container (`make gc`: `--entrypoint python mlflow -m mlstack.gc`).
WORKLOADS = {
    ("Deployment", "mlflow"): ("service", "mlflow"),
    ("Job", "users-init"): ("service", "users-init"),
    ("Job", "mlflow-migrate"): ("target", "upgrade"),
    ("CronJob", "mlflow-gc"): ("target", "gc"),
}
# Compose services with no workload here, and why.
NOT_ON_KUBERNETES = {
    # PostgreSQL and S3 are outside the cluster: the operator gives the bucket and the server's key
    # to it (Secret mlstack-s3-key), so nothing holds an S3 root key to make them with.
    "storage-init",
    # The Service balances the replicas; TLS is the operator's Ingress's (README, Kubernetes).
    "lb-init",
}
MIGRATION_JOB = "mlflow-migrate"
# The arguments a target's module gets here. prepare: migrate, and what a server does first on an
# empty database, once for all replicas (mlstack.upgrade); gc: its own defaults, as `make gc`.
TARGET_ARGS = {"upgrade": ["prepare"], "gc": []}


def kustomize(path: Path) -> list[dict]:
    ensure_programs({"kubectl": "kubernetes-client"})
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def schema_errors(objects: list[dict], versions: list[str]) -> list[str]:
    """What the Kubernetes schemas say against each object; a kind they do not know is an error too."""
    errors = []
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(exc.message)
    return errors


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(K8S_DIR)


@pytest.fixture(scope="module")
def example_secrets() -> list[dict]:
    return kustomize(SECRETS_EXAMPLE)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return compose_config(write_filled_env_file(tmp_path_factory.mktemp("compose") / "filled.env"))


@pytest.fixture(scope="module")
def native_env(tmp_path_factory) -> dict[str, str]:
    return native_environment(tmp_path_factory.mktemp("native-config"))


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def only_container(obj: dict) -> dict:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1 and not pod_spec(obj).get("initContainers"), obj["metadata"]["name"]
    return containers[0]


def workload(objects: list[dict], kind: str, name: str) -> dict:
    found = by_kind(objects, kind)
    assert name in found, f"no {kind} {name} in the rendered manifests (has: {sorted(found)})"
    return found[name]


def test_every_object_is_valid_kubernetes(rendered, example_secrets):
    assert kv_utils.major_minor(kv_utils.all_versions()[0]) == OLDEST_KUBERNETES
    assert KUBERNETES_VERSIONS == ["1.25", "1.37"], "kubernetes-validate changed: say the new range in the README"
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered + example_secrets)
    assert {k for k, _ in kinds} == {"ConfigMap", "CronJob", "Deployment", "Job", "PodDisruptionBudget", "Secret",
                                     "Service"}, kinds
    assert schema_errors(rendered + example_secrets, KUBERNETES_VERSIONS) == []


def test_the_schema_check_fails_on_a_broken_manifest(tmp_path, rendered):
    """The validation guarding the manifests must be able to fail: a misspelt field, a wrong type."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree)
    text = (tree / "mlflow.yaml").read_text()
    (tree / "mlflow.yaml").write_text(text.replace("  replicas: 2\n", "  replica: 2\n", 1))
    errors = schema_errors(kustomize(tree), [OLDEST_KUBERNETES])
    assert len(errors) == 1 and errors[0].startswith("Deployment/mlflow on Kubernetes 1.25: spec:"), errors
    assert "'replica' was unexpected" in errors[0], errors
    job = copy.deepcopy(workload(rendered, "Job", MIGRATION_JOB))
    job["spec"]["backoffLimit"] = "none"
    assert schema_errors([job], [OLDEST_KUBERNETES]) == [
        "Job/mlflow-migrate on Kubernetes 1.25: spec.backoffLimit: 'none' is not of type 'integer', 'null'"]
    # An API Kubernetes no longer serves (batch/v1beta1 CronJob went in 1.25) has no schema: an error.
    cronjob = {**workload(rendered, "CronJob", "mlflow-gc"), "apiVersion": "batch/v1beta1"}
    assert schema_errors([cronjob], KUBERNETES_VERSIONS) == [
        f"Couldn't find schema for kind CronJob with api version batch/v1beta1 for kubernetes version {v}"
        for v in KUBERNETES_VERSIONS]


def test_every_compose_service_runs_here_or_is_said_why_not(rendered):
    compose_services = {name for kind, name in WORKLOADS.values() if kind == "service"}
    # Every service settings.py declares an entrypoint or variables for.
    assert compose_services | NOT_ON_KUBERNETES == set(s.SERVICE_MODULES) | set(s.SERVICE_VARS)
    assert not compose_services & NOT_ON_KUBERNETES
    workloads = {(o["kind"], o["metadata"]["name"]) for o in rendered if o["kind"] in ("Deployment", "Job", "CronJob")}
    assert workloads == set(WORKLOADS)


@pytest.mark.parametrize("kind,name", sorted(WORKLOADS))
def test_kubernetes_runs_the_entrypoint_compose_and_the_native_stack_run(rendered, config, kind, name, tmp_path):
    container = only_container(workload(rendered, kind, name))
    how, what = WORKLOADS[(kind, name)]
    if how == "service":
        module = s.SERVICE_MODULES[what]
        assert container["command"] == config["services"][what]["entrypoint"] == ["python", "-m", module]
        assert not container.get("args")
        native = Stack(tmp_path).command(what)
        assert native[0] == sys.executable and native[1:] == ["-m", module]
    else:
        service, module = server_tasks()[what]
        assert container["command"] == ["python", "-m", module, *TARGET_ARGS[what]]
        what = service  # compose runs the target in this service's container: the same image
    image = container["image"]
    compose_image = config["services"][what]["image"]
    assert image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == compose_image.rsplit(":", 1)[0] == "mlstack-services"


@pytest.mark.parametrize("kind,name", sorted(WORKLOADS))
def test_kubernetes_passes_the_variables_compose_and_the_native_stack_pass(rendered, config, native_env, kind, name):
    how, what = WORKLOADS[(kind, name)]
    service = what if how == "service" else server_tasks()[what][0]
    env = only_container(workload(rendered, kind, name))["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"{kind}/{name} sets a variable twice: {names}"
    assert not only_container(workload(rendered, kind, name)).get("envFrom"), "every variable is named, none bulk-loaded"
    compose_names = set(config["services"][service]["environment"])
    native = native_service_environment(service, native_env)
    assert LEAKED not in native.values()
    assert set(names) == compose_names == stack_variable_names(native) == declared_names(service), \
        f"{kind}/{name}: {sorted(set(names) ^ declared_names(service))}"


def test_secrets_come_from_secrets_and_settings_from_the_configmap(rendered, example_secrets):
    settings = by_kind(rendered, "ConfigMap")
    assert len(settings) == 1
    (configmap_name, configmap), = settings.items()
    secrets = {name: set(secret.get("data", {})) for name, secret in by_kind(example_secrets, "Secret").items()}
    secret_names = {v.name for v in s.SECRET_VARS}
    assert not secret_names & set(configmap["data"]), "a secret in settings.env"
    used_settings = set()
    for kind, name in WORKLOADS:
        spec = pod_spec(workload(rendered, kind, name))
        for e in only_container(workload(rendered, kind, name))["env"]:
            source = e.get("valueFrom", {})
            if e["name"] in secret_names:
                ref = source.get("secretKeyRef")
                assert ref and ref["key"] in secrets.get(ref["name"], ()), f"{kind}/{name}: {e}"
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["name"] == configmap_name and ref["key"] == e["name"], e
                assert e["name"] in configmap["data"], e
                used_settings.add(e["name"])
            else:
                # Only where things are inside the pod and the cluster, fixed as compose fixes them.
                assert e["name"] in {"MLFLOW_HOST", "MLFLOW_PORT", "S3_CREDENTIALS_FILE", "MLFLOW_INTERNAL_URL"}, e
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, volume
    assert used_settings == set(configmap["data"]), "settings.env holds exactly what the workloads read"
    # Nothing real is committed: every example secret value is empty, or an empty JSON key.
    for secret in by_kind(example_secrets, "Secret").values():
        for key, value in secret.get("data", {}).items():
            raw = base64.b64decode(value).decode()
            assert raw == "" or all(v == "" for v in json.loads(raw).values()), (secret["metadata"]["name"], key)


def test_the_server_key_is_where_s3_credentials_file_points(rendered, example_secrets):
    key_secret = by_kind(example_secrets, "Secret")["mlstack-s3-key"]
    for kind, name in WORKLOADS:
        obj = workload(rendered, kind, name)
        env = {e["name"]: e.get("value") for e in only_container(obj)["env"]}
        if "S3_CREDENTIALS_FILE" not in env:
            continue
        path = Path(env["S3_CREDENTIALS_FILE"])
        assert str(path) == s.S3_CREDENTIALS_FILE.default
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        mounts = [m for m in only_container(obj)["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert len(mounts) == 1 and mounts[0]["readOnly"], (kind, name)
        assert volumes[mounts[0]["name"]]["secret"]["secretName"] == "mlstack-s3-key"
        assert path.name in key_secret["data"]


def test_the_server_runs_replicated_behind_a_service_with_health_probes(rendered):
    deployment = workload(rendered, "Deployment", "mlflow")
    assert deployment["spec"]["replicas"] >= 2
    container = only_container(deployment)
    port = {e["name"]: e.get("value") for e in container["env"]}["MLFLOW_PORT"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(port)}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    service = by_kind(rendered, "Service")["mlflow"]  # the name MLFLOW_INTERNAL_URL and the allowed hosts use
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(int(port), "http")]
    users_init = {e["name"]: e.get("value") for e in only_container(workload(rendered, "Job", "users-init"))["env"]}
    assert users_init["MLFLOW_INTERNAL_URL"] == f"http://mlflow:{port}"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _selected(objects: list[dict], selector: str) -> list[tuple[str, str]]:
    """The objects a set-based label selector (`key in (a,b)`, as the README gives kubectl) picks."""
    match = re.fullmatch(r"([\w./-]+) in \(([\w,.-]+)\)", selector)
    assert match, f"not a set-based selector: {selector}"
    key, values = match.group(1), set(match.group(2).split(","))
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects
                  if o["metadata"].get("labels", {}).get(key) in values)


def test_the_readme_order_runs_the_migration_to_completion_before_the_rollout(rendered):
    """The first apply step picks exactly the settings and the migration Job; then kubectl waits
    for the Job to complete; only then is the whole kustomization (the server) applied."""
    text = README.read_text()
    section = text[text.index("## Kubernetes"):]
    section = section[:section.index("\n## ", 1)]
    steps = [line.strip() for line in section.splitlines() if line.strip().startswith("kubectl ")]
    first = next(i for i, line in enumerate(steps) if line.startswith("kubectl apply -k infra/k8s -l "))
    selector = re.search(r"-l '([^']+)'", steps[first]).group(1)
    assert _selected(rendered, selector) == [("ConfigMap", by_kind(rendered, "ConfigMap").popitem()[0]),
                                             ("Job", MIGRATION_JOB)]
    wait = steps.index(f"kubectl wait --for=condition=complete --timeout=15m job/{MIGRATION_JOB}")
    rollout = steps.index("kubectl apply -k infra/k8s")
    assert first < wait < rollout, steps
    # A finished Job cannot be changed, only replaced: the procedure deletes it first.
    assert steps.index(f"kubectl delete job {MIGRATION_JOB} users-init --ignore-not-found") < first
    assert steps.index("kubectl apply -k infra/k8s/secrets") < first
