"""The native stack end to end: real PostgreSQL, SeaweedFS and MLflow processes (one per session).

Clients run in subprocesses with only the tracking URI and the trainer's credentials, as a
teammate's machine would; the bucket is inspected behind the server's back with the S3 root key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
import requests
from botocore.exceptions import ClientError

from mlstack import seaweed_security
from mlstack import settings as s
from mlstack.native.stack import SERVICES, Stack, StackError

REPO = Path(__file__).resolve().parents[2]
MLSTACK_CLI = Path(sys.executable).parent / "mlstack"

BIG_MB = 60
PARAMS = {"lr": "0.001", "batch_size": "32", "model": "tiny-llama"}
LOSSES = [2.5, 1.75, 1.25, 0.875, 0.5]  # loss at steps 0..4

# Runs in a subprocess whose environment holds MLFLOW_TRACKING_* and nothing about S3.
LOG_RUN = r"""
import hashlib, json, os, sys
import mlflow

out_path, work, exp_name, big_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
params, losses = json.loads(sys.argv[5]), json.loads(sys.argv[6])
assert not [k for k in os.environ if k.startswith(("AWS_", "S3_"))], "client must not see S3 settings"

files = {}
def write(rel, chunks):
    path = os.path.join(work, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk); digest.update(chunk); size += len(chunk)
    files[rel] = {"size": size, "sha256": digest.hexdigest()}

write("outputs/notes.txt", [b"trained on the tiny config\n"])
write("outputs/nested/config.json", [json.dumps(params).encode()])
write("weights/model.bin", (os.urandom(1 << 20) for _ in range(big_mb)))

exp_id = mlflow.set_experiment(exp_name).experiment_id
with mlflow.start_run() as run:
    mlflow.log_params(params)
    for step, value in enumerate(losses):
        mlflow.log_metric("loss", value, step=step)
    mlflow.log_artifacts(os.path.join(work, "outputs"), artifact_path="outputs")
    mlflow.log_artifact(os.path.join(work, "weights", "model.bin"), artifact_path="weights")
with open(out_path, "w") as fh:
    json.dump({"experiment_id": exp_id, "run_id": run.info.run_id, "files": files}, fh)
"""

DOWNLOAD = r"""
import sys
import mlflow.artifacts
print(mlflow.artifacts.download_artifacts(run_id=sys.argv[1], dst_path=sys.argv[2]))
"""

METRICS = r"""
import json, sys
from mlflow import MlflowClient
client = MlflowClient()
run = client.get_run(sys.argv[2])
history = client.get_metric_history(sys.argv[2], "loss")
with open(sys.argv[1], "w") as fh:
    json.dump({"params": run.data.params,
               "loss": sorted([m.step, m.value] for m in history)}, fh)
"""


def run_client(native_stack, code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=native_stack.client_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def api(native_stack, path: str) -> str:
    return f"{native_stack.uri}/api/2.0/mlflow/{path}"


@pytest.fixture(scope="module")
def logged_run(native_stack, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("client")
    out = work / "result.json"
    run_client(native_stack, LOG_RUN, str(out), str(work / "files"), f"stack-test-{uuid.uuid4().hex[:8]}",
               str(BIG_MB), json.dumps(PARAMS), json.dumps(LOSSES))
    return json.loads(out.read_text())


# -- health ---------------------------------------------------------------------------------------


def test_stack_healthy_from_empty_state_dir(native_stack):
    assert requests.get(f"{native_stack.uri}/health", timeout=10).status_code == 200
    status = native_stack.stack.status()
    assert set(status) == set(SERVICES)
    assert all(info["running"] for info in status.values()), status
    expected_names = {"postgres": "postgres", "s3": "weed", "mlflow": "python"}
    for service, info in status.items():
        proc = psutil.Process(info["pid"])
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        assert expected_names[service] in proc.name(), (service, proc.name())
    # The MLflow entrypoint exec'd into gunicorn, which runs the configured number of workers.
    master = psutil.Process(status["mlflow"]["pid"])
    assert "gunicorn" in " ".join(master.cmdline())
    workers = [c for c in master.children() if "gunicorn" in " ".join(c.cmdline()) or "python" in c.name()]
    assert len(workers) == int(native_stack.env["MLFLOW_WORKERS"])
    # The state dir was empty: everything the stack made lives in it.
    state = native_stack.stack.state_dir
    for name in ("stack.json", "secrets.env", "postgres/PG_VERSION", "credentials/mlflow-s3.json"):
        assert (state / name).exists(), name


# -- a client with only the tracking URI and trainer credentials ------------------------------------


def test_artifacts_land_in_bucket_with_exact_sizes(native_stack, logged_run):
    prefix = f"artifacts/{logged_run['experiment_id']}/{logged_run['run_id']}/artifacts/"
    expected = {prefix + rel: info["size"] for rel, info in logged_run["files"].items()}
    assert expected[prefix + "weights/model.bin"] == BIG_MB << 20 >= 50 << 20
    assert native_stack.bucket_keys(prefix) == expected
    # Bytes in the store are the bytes the client wrote (hash straight from S3 for every object).
    s3 = native_stack.s3_root()
    for rel, info in logged_run["files"].items():
        body = s3.get_object(Bucket=native_stack.bucket, Key=prefix + rel)["Body"]
        digest = hashlib.sha256()
        for chunk in iter(lambda: body.read(1 << 20), b""):
            digest.update(chunk)
        assert digest.hexdigest() == info["sha256"], rel


def test_artifacts_download_byte_identical(native_stack, logged_run, tmp_path):
    run_client(native_stack, DOWNLOAD, logged_run["run_id"], str(tmp_path))
    got = {str(p.relative_to(tmp_path)): p for p in tmp_path.rglob("*") if p.is_file()}
    assert set(got) == set(logged_run["files"])
    for rel, info in logged_run["files"].items():
        assert got[rel].stat().st_size == info["size"], rel
        assert sha256_file(got[rel]) == info["sha256"], rel


def test_params_and_metric_history_exact(native_stack, logged_run, tmp_path):
    out = tmp_path / "metrics.json"
    run_client(native_stack, METRICS, str(out), logged_run["run_id"])
    data = json.loads(out.read_text())
    assert data["params"] == PARAMS
    assert data["loss"] == [[step, value] for step, value in enumerate(LOSSES)]


# -- auth -----------------------------------------------------------------------------------------


def test_requests_without_or_with_wrong_credentials_are_401(native_stack):
    url = api(native_stack, "experiments/search")
    assert requests.get(url, params={"max_results": 1}, timeout=10).status_code == 401
    user, _ = native_stack.trainer_auth
    assert requests.get(url, params={"max_results": 1}, auth=(user, "wrong-password"), timeout=10).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=("nobody-here", "x"), timeout=10).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=native_stack.trainer_auth, timeout=10).status_code == 200


def test_foreign_host_header_is_refused(native_stack):
    url = api(native_stack, "experiments/search")
    resp = requests.get(url, params={"max_results": 1}, auth=native_stack.trainer_auth,
                        headers={"Host": "evil.example.com"}, timeout=10)
    assert resp.status_code != 200
    assert resp.status_code in (400, 403), resp.status_code


def test_trainer_can_track_but_not_administer(native_stack):
    auth = native_stack.trainer_auth
    resp = requests.post(api(native_stack, "experiments/create"), json={"name": f"auth-{uuid.uuid4().hex[:8]}"},
                         auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    exp_id = resp.json()["experiment_id"]
    resp = requests.post(api(native_stack, "runs/create"), json={"experiment_id": exp_id}, auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["run"]["info"]["run_id"]
    resp = requests.post(api(native_stack, "runs/log-metric"),
                         json={"run_id": run_id, "key": "acc", "value": 0.5, "timestamp": 0, "step": 1},
                         auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    resp = requests.post(api(native_stack, "runs/log-parameter"), json={"run_id": run_id, "key": "k", "value": "v"},
                         auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text

    resp = requests.post(api(native_stack, "users/create"), json={"username": "intruder", "password": "pw-123456"},
                         auth=auth, timeout=10)
    assert resp.status_code == 403, resp.text
    resp = requests.patch(api(native_stack, "users/update-admin"), json={"username": auth[0], "is_admin": True},
                          auth=auth, timeout=10)
    assert resp.status_code == 403, resp.text
    # Nothing changed: the trainer is still no admin and the intruder does not exist.
    admin = native_stack.admin_auth
    got = requests.get(api(native_stack, "users/get"), params={"username": auth[0]}, auth=admin, timeout=10)
    assert got.status_code == 200 and got.json()["user"]["is_admin"] is False
    got = requests.get(api(native_stack, "users/get"), params={"username": "intruder"}, auth=admin, timeout=10)
    assert got.status_code != 200


# -- storage --------------------------------------------------------------------------------------


def scoped_client(native_stack):
    creds = json.loads(Path(native_stack.env["S3_CREDENTIALS_FILE"]).read_text())
    return boto3.client("s3", endpoint_url=native_stack.env["S3_ENDPOINT_URL"], aws_access_key_id=creds["access_key"],
                        aws_secret_access_key=creds["secret_key"], region_name="us-east-1")


def test_mlflow_key_is_scoped_to_the_stack_bucket(native_stack):
    creds_file = Path(native_stack.env["S3_CREDENTIALS_FILE"])
    assert creds_file.stat().st_mode & 0o077 == 0, "credentials file must be private"
    creds = json.loads(creds_file.read_text())
    assert creds["access_key"] != native_stack.env["S3_ROOT_USER"]

    scoped, root = scoped_client(native_stack), native_stack.s3_root()
    key = f"scope-test/{uuid.uuid4().hex}"
    scoped.put_object(Bucket=native_stack.bucket, Key=key, Body=b"ok")
    assert scoped.get_object(Bucket=native_stack.bucket, Key=key)["Body"].read() == b"ok"
    scoped.delete_object(Bucket=native_stack.bucket, Key=key)

    other = f"other-{uuid.uuid4().hex[:12]}"
    root.create_bucket(Bucket=other)
    try:
        root.put_object(Bucket=other, Key="secret.txt", Body=b"root only")
        with pytest.raises(ClientError) as denied:
            scoped.put_object(Bucket=other, Key="x", Body=b"nope")
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError) as denied:
            scoped.get_object(Bucket=other, Key="secret.txt")
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
        assert [o["Key"] for o in root.list_objects_v2(Bucket=other).get("Contents", [])] == ["secret.txt"]
    finally:
        for obj in root.list_objects_v2(Bucket=other).get("Contents", []):
            root.delete_object(Bucket=other, Key=obj["Key"])
        root.delete_bucket(Bucket=other)


# SeaweedFS grows a collection (a bucket) by this many volumes at once.
VOLUMES_PER_NEW_BUCKET = 7


def volume_topology(native_stack) -> dict:
    """The SeaweedFS master's volume counts (Max, Free, ...)."""
    master = native_stack.stack.state["s3_internal_ports"]["master"]
    # The master answers only to the server's own client certificate (mlstack.seaweed_security).
    tls = native_stack.stack.s3_security_dir
    answer = requests.get(f"https://127.0.0.1:{master}/dir/status", timeout=10, verify=str(tls / seaweed_security.CA_CERT),
                          cert=(str(tls / seaweed_security.CERT), str(tls / seaweed_security.KEY)))
    return answer.json()["Topology"]


def test_s3_store_is_not_capped_at_eight_volumes(native_stack):
    """SeaweedFS grows 7 volumes per bucket; its default cap of 8 left the stack full at ~7 GB."""
    assert volume_topology(native_stack)["Max"] > 8
    root = native_stack.s3_root()
    root.put_object(Bucket=native_stack.bucket, Key="capacity-test", Body=b"x")
    # With -volume.max=0 the cap follows the disk's free space at start (1 GB volumes), so it is
    # the host, not the stack, that decides whether a new bucket's 7 volumes fit: say so plainly
    # rather than fail inside SeaweedFS with an InternalError. One more bucket (7 + 7 volumes)
    # already proves the old cap of 8 gone.
    topology = volume_topology(native_stack)
    free_gb = shutil.disk_usage(native_stack.stack.state_dir).free / 1e9
    assert topology["Free"] >= VOLUMES_PER_NEW_BUCKET, (
        f"this host's disk has {free_gb:.1f} GB free, room for {topology['Free']} more SeaweedFS volumes of 1 GB; "
        f"the test needs {VOLUMES_PER_NEW_BUCKET}: free some disk space")
    bucket = f"capacity-{uuid.uuid4().hex[:8]}"
    try:
        root.create_bucket(Bucket=bucket)
        root.put_object(Bucket=bucket, Key="k", Body=os.urandom(100_000))
        assert root.head_object(Bucket=bucket, Key="k")["ContentLength"] == 100_000
    finally:
        root.delete_object(Bucket=native_stack.bucket, Key="capacity-test")
        if _exists(root, bucket):
            for obj in root.list_objects_v2(Bucket=bucket).get("Contents", []):
                root.delete_object(Bucket=bucket, Key=obj["Key"])
            root.delete_bucket(Bucket=bucket)


def _exists(s3, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except ClientError:
        return False


@pytest.mark.parametrize("service", ["storage-init", "users-init"])
def test_init_jobs_are_idempotent(native_stack, service):
    creds_file = Path(native_stack.env["S3_CREDENTIALS_FILE"])
    before = creds_file.read_text()
    env = s.service_environment(service, native_stack.env, native_stack.env)
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", s.SERVICE_MODULES[service]], env=env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    if service == "storage-init":
        assert "already" in proc.stdout
    else:
        assert "updated password of user" in proc.stdout
    # The scoped key is kept (the running server holds it) and still works.
    assert creds_file.read_text() == before
    scoped_client(native_stack).list_objects_v2(Bucket=native_stack.bucket, MaxKeys=1)
    # The trainer still logs in, and the server still writes artifacts with its key.
    resp = requests.get(api(native_stack, "experiments/search"), params={"max_results": 1},
                        auth=native_stack.trainer_auth, timeout=10)
    assert resp.status_code == 200
    assert requests.get(f"{native_stack.uri}/health", timeout=10).status_code == 200


# -- configuration guards -------------------------------------------------------------------------


@pytest.fixture
def no_stack_vars(monkeypatch):
    for var in s.ALL_VARS:
        monkeypatch.delenv(var.name, raising=False)


def test_launcher_refuses_placeholder(tmp_path, no_stack_vars):
    env_file = tmp_path / "placeholder.env"
    env_file.write_text("POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD=change-me\nMLFLOW_ADMIN_PASSWORD=a-real-secret\n")
    stack = Stack(tmp_path / "state", env_file)
    with pytest.raises(StackError, match="POSTGRES_PASSWORD") as err:
        stack.environment()
    assert "MLFLOW_ADMIN_PASSWORD" not in str(err.value)
    with pytest.raises(StackError, match="POSTGRES_PASSWORD"):
        stack.up()
    # Nothing was started or initialised.
    assert not (tmp_path / "state" / "postgres").exists()
    assert not (tmp_path / "state" / "s3").exists()
    assert not stack.state.get("pids")
    assert all(not info["running"] for info in stack.status().values())


def check_env(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "infra" / "check-env.sh"), str(path)], capture_output=True, text=True)


def test_check_env_script(tmp_path):
    example = (REPO / ".env.example").read_text()
    placeholders = sorted(line.split("=", 1)[0] for line in example.splitlines()
                          if "=" in line and not line.startswith("#") and "change-me" in line)
    assert {"POSTGRES_PASSWORD", "S3_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "MLFLOW_TRAINER_PASSWORD"} <= set(placeholders)

    unfilled = tmp_path / "unfilled.env"
    unfilled.write_text(example)
    proc = check_env(unfilled)
    assert proc.returncode == 1
    for name in placeholders:
        assert f"- {name}" in proc.stderr, name

    partly = tmp_path / "partly.env"
    partly.write_text(example.replace("POSTGRES_PASSWORD=change-me", "POSTGRES_PASSWORD=s3cret-value"))
    proc = check_env(partly)
    assert proc.returncode == 1
    assert "- POSTGRES_PASSWORD" not in proc.stderr and "- S3_ROOT_PASSWORD" in proc.stderr

    proc = check_env(tmp_path / "missing.env")
    assert proc.returncode == 2
    assert "missing.env not found" in proc.stderr

    filled = tmp_path / "filled.env"
    filled.write_text(example.replace("change-me", uuid.uuid4().hex))
    proc = check_env(filled)
    assert proc.returncode == 0, proc.stderr


def test_status_cli_prints_tracking_uri(native_stack, tmp_path):
    proc = subprocess.run([str(MLSTACK_CLI), "--state-dir", str(native_stack.stack.state_dir), "status"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Tracking URI: {native_stack.uri}" in proc.stdout
    for service in SERVICES:
        assert any(line.split()[:2] == [service, "running"] for line in proc.stdout.splitlines()), proc.stdout


def test_run_writes_need_permission_on_the_runs_experiment(native_stack):
    """The auth check looks a run's experiment up with a narrow query (mlstack.patches.light_run_lookup); it must
    still deny what MLflow denies and allow what it allows."""
    admin, trainer = native_stack.admin_auth, native_stack.trainer_auth
    resp = requests.post(api(native_stack, "experiments/create"), json={"name": f"owned-{uuid.uuid4().hex[:8]}"},
                         auth=admin, timeout=10)
    exp_id = resp.json()["experiment_id"]
    run_id = requests.post(api(native_stack, "runs/create"), json={"experiment_id": exp_id}, auth=admin,
                           timeout=10).json()["run"]["info"]["run_id"]
    batch = {"run_id": run_id, "metrics": [{"key": "loss", "value": 1.0, "timestamp": 0, "step": 1}]}

    def log_batch(body):
        return requests.post(api(native_stack, "runs/log-batch"), json=body, auth=trainer, timeout=10)

    assert log_batch(batch).status_code == 403  # default permission is READ
    assert log_batch({**batch, "run_id": uuid.uuid4().hex}).status_code == 403  # unknown run: denied, no 404 oracle
    resp = requests.post(f"{native_stack.uri}/api/3.0/mlflow/users/permissions/grant",
                         json={"username": trainer[0], "resource_type": "experiment", "resource_id": exp_id,
                               "permission": "EDIT"}, auth=admin, timeout=10)
    assert resp.status_code == 200, resp.text
    assert log_batch(batch).status_code == 200
    got = requests.get(api(native_stack, "runs/get"), params={"run_id": run_id}, auth=trainer, timeout=10)
    assert got.json()["run"]["data"]["metrics"][0]["value"] == 1.0
