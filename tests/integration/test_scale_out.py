"""Two MLflow server instances behind HAProxy with TLS, started by the native launcher
(STACK_SERVERS=2): one schema made once, the same answers from either instance, and trainers that
lose nothing when one instance is killed mid-run."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import psycopg2
import pytest
import requests
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mlstack.native.stack import BALANCER, Stack
from mlstack.schema_state import AUTH_VERSION_TABLE, TRACKING_VERSION_TABLE
from mltrainer.transfer import MiB, RunArtifacts
from running_stack import RunningStack, environ_set, free_stack_ports
from system_packages import ensure_programs
from trainer_support import artifact_prefix

LOAD_SECONDS = 60.0
KILL_AFTER = 25.0  # seconds into the load: both instances have served by then, and the rest runs on one
UPLOADERS = 4


@pytest.fixture(scope="module")
def scaled_stack():
    ensure_programs({"haproxy": "haproxy"})
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-scale-"))
    ports = free_stack_ports()
    try:
        # Only the start sees STACK_SERVERS: the layout it chose must hold for later commands.
        with environ_set({**ports, "STACK_SERVERS": "2"}):
            Stack(state_dir).up()
        # The ports stay chosen for the module, as the session's stack keeps its own in os.environ
        # (tests/conftest.py): otherwise this stack's environment would name the session's ports.
        with environ_set(ports):
            stack = Stack(state_dir)
            yield RunningStack(stack, stack.environment())
    finally:
        Stack(state_dir).down()
        shutil.rmtree(state_dir, ignore_errors=True)


def instance_urls(stack: RunningStack) -> list[str]:
    return [f"http://127.0.0.1:{port}" for port in stack.stack.state["mlflow_instance_ports"]]


def test_instances_started_together_make_one_schema(scaled_stack):
    """Both instances started at the same moment on an empty database: one of them made the
    databases and schemas, under the lock; the other waited and made nothing; neither failed."""
    env = scaled_stack.env
    assert env["MLFLOW_PUBLIC_URL"].startswith("https://")
    logs = [(scaled_stack.stack.logs / f"{key}.log").read_text() for key in ("mlflow", "mlflow-2")]
    entry = ["\n".join(line for line in log.splitlines() if line.startswith("[mlflow-entrypoint]")) for log in logs]
    assert sum(e.count("initialising the tracking schema") for e in entry) == 1, entry
    assert sum(e.count(f"creating database {env['MLFLOW_AUTH_DB']}") for e in entry) == 1, entry
    assert not any("Traceback" in log or "refusing to start" in log for log in logs)
    for db, table in ((env["POSTGRES_DB"], TRACKING_VERSION_TABLE), (env["MLFLOW_AUTH_DB"], AUTH_VERSION_TABLE)):
        conn = psycopg2.connect(host="127.0.0.1", port=env["DB_PORT"], user=env["POSTGRES_USER"],
                                password=env["POSTGRES_PASSWORD"], dbname=db)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table}")
                assert cur.fetchone()[0] == 1, f"{db}: alembic_version should hold one revision"
        finally:
            conn.close()
    admin = env["MLFLOW_ADMIN_USER"]
    assert requests.get(f"{instance_urls(scaled_stack)[1]}/api/2.0/mlflow/users/get", params={"username": admin},
                        auth=scaled_stack.admin_auth, timeout=30).json()["user"]["is_admin"] is True


def test_balancer_speaks_only_tls_with_the_printed_certificate(scaled_stack):
    from mlstack.native.cli import client_exports

    cert = scaled_stack.env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    assert cert == str(scaled_stack.stack.state_dir / "tls" / "cert.pem")
    exports = dict(line.removeprefix("export ").split("=", 1) for line in client_exports(scaled_stack.env))
    assert exports["MLFLOW_TRACKING_SERVER_CERT_PATH"] == cert
    assert exports["MLFLOW_TRACKING_URI"] == scaled_stack.uri
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(scaled_stack.uri + "/health", timeout=10)  # not trusted without the certificate
    assert requests.get(scaled_stack.uri + "/health", timeout=10, verify=cert).status_code == 200
    plain = scaled_stack.uri.replace("https://", "http://")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(plain + "/health", timeout=10)  # no clear-text listener on the public port
    # The same certificate after a restart of the balancer's side: kept, not made anew.
    from mlstack.certificates import fingerprint
    from cryptography import x509

    first = fingerprint(x509.load_pem_x509_certificate(Path(cert).read_bytes()))
    assert scaled_stack.stack.tls_material(scaled_stack.env).fingerprint == first


def test_a_new_teammate_is_told_the_https_uri_and_the_certificate(scaled_stack):
    proc = subprocess.run([sys.executable, "-m", "mlstack.native.cli", "--state-dir", str(scaled_stack.stack.state_dir),
                           "user", f"mate{uuid.uuid4().hex[:6]}"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("STACK_")})
    assert proc.returncode == 0, proc.stderr
    assert f"export MLFLOW_TRACKING_URI={scaled_stack.uri}" in proc.stdout
    fingerprint = scaled_stack.stack.tls_material(scaled_stack.env).fingerprint
    assert f"MLFLOW_TRACKING_SERVER_CERT_PATH=<a copy of {scaled_stack.env['MLFLOW_TRACKING_SERVER_CERT_PATH']}>" in proc.stdout
    assert fingerprint in proc.stdout


def test_logins_permissions_and_downloads_are_the_same_on_every_instance(scaled_stack):
    """Straight to each instance, and through the balancer: a wrong password is refused, the right
    one let in, an edit of another user's experiment denied, and an artifact streams back whole."""
    env, cert = scaled_stack.env, scaled_stack.env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    with environ_set(scaled_stack.client_env("admin")):
        admin = MlflowClient(scaled_stack.uri)
        experiment = admin.create_experiment(f"admins-own-{uuid.uuid4().hex[:8]}")
        run = admin.create_run(experiment)
        payload = os.urandom(300_000)  # above HAProxy's buffer: streamed, not held
        local = Path(tempfile.mkdtemp()) / "weights.bin"
        local.write_bytes(payload)
        admin.log_artifact(run.info.run_id, str(local), "checkpoints/step-1")
    user, password = scaled_stack.trainer_auth
    download = f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run.info.run_id}/artifacts/checkpoints/step-1/weights.bin"
    for base in [*instance_urls(scaled_stack), scaled_stack.uri]:
        verify = cert if base.startswith("https") else True
        get = f"{base}/api/2.0/mlflow/experiments/get"
        wrong = requests.get(get, params={"experiment_id": experiment}, auth=(user, "not-" + password),
                             timeout=30, verify=verify)
        assert wrong.status_code == 401, (base, wrong.status_code)
        right = requests.get(get, params={"experiment_id": experiment}, auth=(user, password), timeout=30, verify=verify)
        assert right.status_code == 200, (base, right.text)
        denied = requests.post(f"{base}/api/2.0/mlflow/experiments/update", auth=(user, password), timeout=30,
                               verify=verify, json={"experiment_id": experiment, "new_name": "taken-over"})
        assert denied.status_code == 403, (base, denied.status_code, denied.text)
        got = requests.get(base + download, auth=(user, password), timeout=60, verify=verify)
        assert got.status_code == 200 and hashlib.sha256(got.content).digest() == hashlib.sha256(payload).digest(), base
    with environ_set(scaled_stack.client_env("admin")):
        assert admin.get_experiment(experiment).name.startswith("admins-own-")
    assert env["MLFLOW_TRUSTED_PROXIES"].split(",")[0] == "127.0.0.1"


class Load:
    """Trainer-like clients and a metrics logger, each in its own thread with its own client,
    recording what they sent and any error they saw."""

    def __init__(self, uri: str, work: Path):
        self.uri, self.work = uri, work
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.sent_files: dict[str, dict[str, str]] = {}  # run id -> artifact path -> sha256
        self.sent_steps: dict[str, list[int]] = {}  # run id -> steps of its metrics
        self.step_times: list[float] = []  # when each checkpoint finished
        self.experiment = MlflowClient(uri).create_experiment(f"scale-out-{uuid.uuid4().hex[:8]}")

    def _guard(self, body):
        def run():
            try:
                body()
            except BaseException:
                self.errors.append(traceback.format_exc())
        return threading.Thread(target=run, daemon=True)

    def uploader(self, index: int) -> threading.Thread:
        def body():
            client = MlflowClient(self.uri)
            run = client.create_run(self.experiment)
            run_id = run.info.run_id
            files, steps = self.sent_files.setdefault(run_id, {}), self.sent_steps.setdefault(run_id, [])
            # Small files through the server (proxied), the big one straight to S3 on presigned URLs.
            store = RunArtifacts.for_artifact_uri(run.info.artifact_uri, part_size=5 * MiB, direct_min_size=1 * MiB)
            folder = self.work / f"uploader-{index}"
            folder.mkdir()
            step = 0
            while not self.stop.is_set():
                step += 1
                for name, size in (("config.json", 900), ("model.safetensors", 200_000), ("optimizer.pt", MiB + 4096)):
                    data = os.urandom(size)
                    (folder / name).write_bytes(data)
                    store.log_artifact(str(folder / name), f"checkpoints/step-{step}")
                    files[f"checkpoints/step-{step}/{name}"] = hashlib.sha256(data).hexdigest()
                client.log_metric(run_id, "loss", 1.0 / step, step=step)
                steps.append(step)
                self.step_times.append(time.monotonic())
                time.sleep(0.5)
            client.set_terminated(run_id)
        return self._guard(body)

    def metrics_logger(self) -> threading.Thread:
        def body():
            client = MlflowClient(self.uri)
            run_id = client.create_run(self.experiment).info.run_id
            steps = self.sent_steps.setdefault(run_id, [])
            step = 0
            while not self.stop.is_set():
                ts = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(f"m{k}", float(step * k), ts, step) for k in range(10)])
                steps.append(step)
                step += 1
                time.sleep(0.05)
            client.set_terminated(run_id)
        return self._guard(body)


def kill_instance(stack: Stack, key: str) -> None:
    """SIGKILL the instance's whole process group (gunicorn and its workers), as a dead host would."""
    handle = stack.handle(key)
    assert handle is not None and handle.alive(), f"{key} is not running"
    os.killpg(handle.pid, signal.SIGKILL)


def requests_served(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '"POST /api/2.0/mlflow/runs/log-' in line
               or '"PUT /api/2.0/mlflow-artifacts/' in line)


def test_trainers_lose_nothing_when_an_instance_is_killed(scaled_stack, tmp_path, caplog):
    stack = scaled_stack.stack
    # The files of 1 MiB and more go straight to S3 on URLs an instance presigns: a failure there
    # would switch the client to the server path with a warning, hiding a broken presigned path.
    with environ_set(scaled_stack.client_env()), caplog.at_level(logging.WARNING, logger="mltrainer.transfer"):
        load = Load(scaled_stack.uri, tmp_path)
        threads = [load.uploader(i) for i in range(UPLOADERS)] + [load.metrics_logger()]
        began = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(KILL_AFTER)
        served_before = requests_served(stack.logs / "mlflow-2.log")
        kill_instance(stack, "mlflow-2")
        killed_at = time.monotonic()
        time.sleep(max(0.0, LOAD_SECONDS - (killed_at - began)))
        load.stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert load.errors == [], "\n".join(load.errors)
        fell_back = [r.getMessage() for r in caplog.records if r.name == "mltrainer.transfer"]
        assert not fell_back, fell_back

        # Both instances served before the kill; the survivor alone after it.
        assert served_before > 0, "the killed instance never got a request: the balancer did not spread the load"
        assert sum(1 for t in load.step_times if t > killed_at + 2) >= UPLOADERS, "too little ran after the kill"
        assert not stack.handle("mlflow-2").alive() and stack.handle("mlflow").alive() and stack.handle(BALANCER).alive()
        balancer_log = (stack.logs / "balancer.log").read_text(errors="replace")
        assert any("mlflow-2" in line and " is DOWN" in line for line in balancer_log.splitlines()), \
            "HAProxy's health checks never took the killed instance out"

        client = MlflowClient(scaled_stack.uri)
        for run_id, files in load.sent_files.items():
            prefix = artifact_prefix(client, run_id)
            stored = scaled_stack.bucket_keys(prefix)
            assert set(stored) == {prefix + path for path in files}, f"run {run_id}: objects missing or extra"
            s3 = scaled_stack.s3_root()
            for path, digest in files.items():
                body = s3.get_object(Bucket=scaled_stack.bucket, Key=prefix + path)["Body"].read()
                assert hashlib.sha256(body).hexdigest() == digest, f"run {run_id}: {path} differs"
            history = [m.step for m in client.get_metric_history(run_id, "loss")]
            assert sorted(history) == load.sent_steps[run_id], f"run {run_id}: loss points lost or doubled"
        logger_runs = [r for r in load.sent_steps if r not in load.sent_files]
        assert len(logger_runs) == 1
        steps = load.sent_steps[logger_runs[0]]
        assert len(steps) > 100
        for k in range(10):
            history = sorted(m.step for m in client.get_metric_history(logger_runs[0], f"m{k}"))
            assert history == steps, f"metric m{k}: {len(history)} points stored for {len(steps)} sent"
    print(f"[scale-out] {sum(len(v) for v in load.sent_files.values()) // 3} checkpoints, "
          f"{len(steps) * 10} metric points; instance 2 served {served_before} writes before it was killed")
