"""Each patch of MLflow's internals is in effect on the real server, and the server refuses to start
when one cannot take hold (mlstack.patches.self_check).

The outcome tests run a second MLflow server, started by the same entrypoint as the stack's
(``python -m mlstack.mlflow_server``, gunicorn), on the session's PostgreSQL and S3, with what makes
the effect observable: its own temporary directory (TMPDIR), PostgreSQL statement logging for its
connections only (PGOPTIONS), and a public S3 endpoint spelled differently from the one it uses.
The other patches have their outcome tests elsewhere, on the stack's own server:
login_limiter in test_login_limits.py (429 after the guess budget), user_admin_guard in
test_user_accounts.py (a non-admin listing users gets 403), request_limits in test_request_limits.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import psutil
import pytest
import requests
from mlflow.entities import Param
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.tracking import MlflowClient

from mlstack import settings as s
from mlstack.native.processes import Handle, free_port, spawn, stop_tree, tail, wait_until
from mlstack.patches.idle_ping import IDLE_BEFORE_PING_S
from mlstack.patches.streaming_upload import PART_SIZE, PARTS_IN_FLIGHT

from trainer_support import artifact_prefix, read_object

MiB = 1024 * 1024
ENTRYPOINT = [sys.executable, "-m", s.SERVICE_MODULES["mlflow"]]


@dataclass
class Server:
    uri: str
    handle: Handle
    log: Path
    tmpdir: Path


def server_env(native_stack, port: int, settings: dict[str, str] | None = None,
               process: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the stack gives its MLflow server, on another port, one worker; ``settings``
    are stack variables, ``process`` the rest (TMPDIR, PGOPTIONS, PYTHONPATH)."""
    values = {**native_stack.env, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", **(settings or {})}
    return s.service_environment("mlflow", values, {**native_stack.env, **(process or {})})


def healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_server(native_stack, workdir: Path, settings=None, process=None) -> Server:
    port = free_port()
    tmpdir = workdir / "server-tmp"
    tmpdir.mkdir(parents=True)
    log = workdir / "mlflow.log"
    handle = spawn(ENTRYPOINT, env=server_env(native_stack, port, settings, {"TMPDIR": str(tmpdir), **(process or {})}),
                   log_path=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(uri), what="second MLflow server", timeout=240, handle=handle, log_path=log)
    except BaseException:
        stop_tree(handle)
        raise
    return Server(uri, handle, log, tmpdir)


def observed_public_endpoint(native_stack) -> str:
    # localhost, not the 127.0.0.1 the server itself uses: a URL naming it was signed for it.
    return f"http://localhost:{urlsplit(native_stack.env['S3_ENDPOINT_URL']).port}"


@pytest.fixture(scope="module")
def observed(native_stack, tmp_path_factory):
    """A server whose patches' effects can be seen from outside (see the module's docstring)."""
    server = start_server(
        native_stack, tmp_path_factory.mktemp("observed"),
        settings={"S3_PUBLIC_ENDPOINT_URL": observed_public_endpoint(native_stack)},
        # Only this server's connections log their statements (log_statement needs a superuser:
        # the stack's database owner is one).
        process={"PGOPTIONS": "-c log_statement=all"},
    )
    yield server
    stop_tree(server.handle)


@pytest.fixture
def run(observed, mlflow_client_env):
    """A run of the trainer (not an admin: the auth checks run), created through the observed server."""
    client = MlflowClient(tracking_uri=observed.uri)
    name = "patches-in-effect"
    exp = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    created = client.create_run(exp.experiment_id)
    yield client, created
    client.set_terminated(created.info.run_id)


def files_under(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs}


def artifact_url(server: Server, created, name: str) -> str:
    return (f"{server.uri}/api/2.0/mlflow-artifacts/artifacts/"
            f"{created.info.experiment_id}/{created.info.run_id}/artifacts/{name}")


def test_streaming_download_a_download_never_touches_the_servers_temp_dir(observed, run, native_stack):
    client, created = run
    data = os.urandom(32 * MiB)  # far more than the socket buffers hold: the server is mid-send below
    key = artifact_prefix(client, created.info.run_id) + "checkpoint/model.safetensors"
    native_stack.s3_root().put_object(Bucket=native_stack.bucket, Key=key, Body=data)
    before = files_under(observed.tmpdir)
    with requests.get(artifact_url(observed, created, "checkpoint/model.safetensors"), stream=True,
                      auth=native_stack.trainer_auth, timeout=120) as resp:
        assert resp.status_code == 200, resp.text
        first = resp.raw.read(MiB)
        # MLflow's own endpoint copies the whole object into a temporary directory before the
        # first byte goes out and deletes it after the last: it would be there now.
        during = files_under(observed.tmpdir) - before
        rest = resp.raw.read()
    assert during == set()
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(data).digest()


def test_streaming_upload_parts_reach_s3_while_the_body_is_still_arriving(observed, run, native_stack):
    client, created = run
    key = artifact_prefix(client, created.info.run_id) + "checkpoint/optimizer.pt"
    data = os.urandom(3 * PART_SIZE + MiB)
    sent_two_parts, go_on = threading.Event(), threading.Event()

    def body():
        for i in range(0, len(data), MiB):
            if i == 2 * PART_SIZE + MiB:
                sent_two_parts.set()
                go_on.wait(timeout=300)
            yield data[i:i + MiB]

    answer = {}
    before = files_under(observed.tmpdir)
    upload = threading.Thread(target=lambda: answer.setdefault("resp", requests.put(
        artifact_url(observed, created, "checkpoint/optimizer.pt"), data=body(), auth=native_stack.trainer_auth,
        timeout=300)))
    upload.start()
    try:
        assert sent_two_parts.wait(timeout=120)
        s3 = native_stack.s3_root()

        def upload_in_progress() -> bool:
            uploads = s3.list_multipart_uploads(Bucket=native_stack.bucket, Prefix=key).get("Uploads", [])
            return any(u["Key"] == key for u in uploads)

        # MLflow's own endpoint writes the body to a temporary file and sends nothing to S3 until
        # the body has ended; streamed, the first parts are in S3 already.
        deadline = time.monotonic() + 60
        while not (in_progress := upload_in_progress()) and time.monotonic() < deadline:
            time.sleep(0.5)
        spooled = files_under(observed.tmpdir) - before  # MLflow's own endpoint writes the body here
    finally:
        go_on.set()
        upload.join(timeout=300)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert in_progress, "no multipart upload in S3 while the body was still arriving"
    assert spooled == set()
    assert read_object(native_stack, key) == data


def test_streaming_upload_relays_unsigned_bodies_that_s3_still_checks(native_stack, monkeypatch):
    """The relay's S3 client (in-process, on the session's S3) sends each part as UNSIGNED-PAYLOAD
    with its CRC-32, the object arrives whole, and a body altered on the way is refused.

    The body arrives in chunks that straddle the part boundaries, and has more parts than the
    relay keeps buffers for, so each buffer is filled again after its part is stored: a buffer
    reused too early, or a chunk split wrongly, changes the stored bytes."""
    import asyncio

    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    from mlstack.patches.streaming_upload import install_streaming_upload, relay_client

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", native_stack.env["S3_ENDPOINT_URL"])
    install_streaming_upload()
    # Explicit keys: MLflow caches one S3 client per endpoint and explicit keys, so a client made
    # earlier in this process from other environment keys (an earlier stack's) is not reused.
    repo = S3ArtifactRepository(f"s3://{native_stack.bucket}/relay-check/{os.getpid()}",
                                access_key_id=native_stack.env["S3_ROOT_USER"],
                                secret_access_key=native_stack.env["S3_ROOT_PASSWORD"])
    client = relay_client(repo)
    sent = []

    def record(request, **_):
        sent.append((request.url, dict(request.headers)))
        if "partNumber=" in request.url:  # a slow S3, slower for each part: later parts are filled while
            # earlier ones still wait to be sent, and a buffer given back too early is sent changed
            time.sleep(0.1 * int(request.url.rsplit("partNumber=", 1)[1].split("&")[0]))

    def alter(request, **_):
        if request.url.endswith("/altered.bin"):
            request.body = b"jello"

    data = os.urandom((PARTS_IN_FLIGHT + 3) * PART_SIZE + 12345)
    chunk_size = MiB + 7  # never a divisor of the part size

    async def chunks():
        for i in range(0, len(data), chunk_size):
            yield data[i:i + chunk_size]

    client.meta.events.register("before-send.s3", record)
    client.meta.events.register("before-send.s3", alter)
    try:
        asyncio.run(repo.log_artifact_from_async_stream(chunks(), "optimizer.pt", "checkpoint"))
        with pytest.raises(Exception, match="BadDigest"):
            client.put_object(Bucket=native_stack.bucket, Key=f"relay-check/{os.getpid()}/altered.bin", Body=b"hello")
    finally:
        client.meta.events.unregister("before-send.s3", record)
        client.meta.events.unregister("before-send.s3", alter)
    key = f"relay-check/{os.getpid()}/checkpoint/optimizer.pt"
    assert read_object(native_stack, key) == data
    parts = [headers for url, headers in sent if "partNumber=" in url]
    assert len(parts) == PARTS_IN_FLIGHT + 4
    for headers in parts:
        assert headers["X-Amz-Content-SHA256"] in (b"UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD")
        assert "x-amz-checksum-crc32" in {name.lower() for name in headers}  # what S3 checks instead


def test_light_run_lookup_an_auth_check_of_a_metrics_request_does_not_load_the_runs_params(observed, run, native_stack):
    client, created = run
    rid = created.info.run_id
    client.log_batch(rid, params=[Param(f"p{i}", str(i)) for i in range(50)])
    pg_log = native_stack.stack.logs / "postgres.log"
    offset = pg_log.stat().st_size
    resp = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-metric", auth=native_stack.trainer_auth, timeout=60,
                         json={"run_id": rid, "key": "loss", "value": 0.5, "timestamp": 1, "step": 1})
    assert resp.status_code == 200, resp.text
    with open(pg_log, "rb") as fh:
        fh.seek(offset)
        statements = fh.read().decode(errors="replace")
    assert "FROM runs" in statements  # the statements of this request are there to look at
    assert "FROM params" not in statements


def statements_of(native_stack, request) -> str:
    """The SQL the observed server ran (its connections alone log statements) while ``request()`` ran."""
    pg_log = native_stack.stack.logs / "postgres.log"
    offset = pg_log.stat().st_size
    request()
    with open(pg_log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def log_metric(observed, native_stack, rid: str, step: int) -> None:
    resp = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-metric", auth=native_stack.trainer_auth, timeout=60,
                         json={"run_id": rid, "key": "loss", "value": 0.5, "timestamp": 1, "step": step})
    assert resp.status_code == 200, resp.text


def test_light_run_lookup_a_runs_experiment_is_looked_up_once_per_worker(observed, run, native_stack):
    client, _ = run
    fresh = client.create_run(client.get_experiment_by_name("patches-in-effect").experiment_id).info.run_id
    first = statements_of(native_stack, lambda: log_metric(observed, native_stack, fresh, 1))
    second = statements_of(native_stack, lambda: log_metric(observed, native_stack, fresh, 2))
    # The handler reads the run itself (is it active?); the auth check's lookup is the one less.
    assert second.count("FROM runs") == first.count("FROM runs") - 1, (first, second)


def pings(statements: str) -> int:
    return len(re.findall(r"statement: SELECT 1\s*$", statements, flags=re.MULTILINE))


def test_idle_ping_connections_used_moments_ago_are_not_pinged_idle_ones_are(observed, run, native_stack):
    _, created = run
    rid = created.info.run_id
    log_metric(observed, native_stack, rid, 1)
    recent = statements_of(native_stack, lambda: log_metric(observed, native_stack, rid, 2))
    assert "INSERT INTO metrics" in recent and pings(recent) == 0, recent
    time.sleep(IDLE_BEFORE_PING_S + 0.5)
    idle = statements_of(native_stack, lambda: log_metric(observed, native_stack, rid, 3))
    assert pings(idle) >= 1, idle  # MLflow pinged at every checkout: two or three per request


def test_user_lookup_once_the_auth_check_reads_the_user_and_grants_once(observed, run, native_stack):
    _, created = run
    rid = created.info.run_id
    log_metric(observed, native_stack, rid, 1)  # the credential and the run's experiment are remembered
    statements = statements_of(native_stack, lambda: log_metric(observed, native_stack, rid, 2))
    assert statements.count("FROM users") == 1, statements  # MLflow's check loads the user twice
    # ... and then their grants, in a third session: now one statement reads both
    reads = [sql for sql in statements.split("LOG:  statement:") if "FROM users" in sql or "role_permissions" in sql]
    assert len(reads) == 1 and "FROM users" in reads[0] and "JOIN role_permissions" in reads[0], statements
    wrong = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-metric", auth=("trainer", "not-the-password"),
                          json={"run_id": rid, "key": "loss", "value": 0.5, "timestamp": 1, "step": 3}, timeout=60)
    assert wrong.status_code == 401, wrong.text


def test_metric_upsert_a_batch_is_one_statement_and_the_latest_values_are_mlflows(observed, run, native_stack):
    client, created = run
    rid = created.info.run_id
    body = {"run_id": rid, "metrics": [{"key": f"m{k}", "value": float(step * 10 + k), "timestamp": 1000 + step,
                                        "step": step} for step in (3, 1, 2) for k in range(10)]}

    def log_batch():
        resp = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-batch", auth=native_stack.trainer_auth,
                             json=body, timeout=60)
        assert resp.status_code == 200, resp.text

    warm = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-batch", auth=native_stack.trainer_auth, timeout=60,
                         json={"run_id": rid, "metrics": []})  # the auth check now knows the run's experiment
    assert warm.status_code == 200, warm.text
    statements = statements_of(native_stack, log_batch)
    assert statements.count("INSERT INTO metrics") == 1, statements
    assert statements.count("INSERT INTO latest_metrics") == 1, statements
    assert "UPDATE latest_metrics" not in statements and "FOR UPDATE" not in statements, statements
    # A metrics-only batch reads its run once, in one session (MLflow's log_batch reads it twice),
    # in the statement that writes the points and the latest values: one round trip.
    assert statements.count("FROM runs") == 1, statements
    assert any("FROM runs" in line and "INSERT INTO metrics" in line and "INSERT INTO latest_metrics" in line
               for line in statements.splitlines()), statements
    log_batch()  # the same points again (a retried request): accepted, stored once
    latest = client.get_run(rid).data.metrics
    assert latest == {f"m{k}": float(30 + k) for k in range(10)}  # step 3's, though step 2 came last
    assert sorted(m.step for m in client.get_metric_history(rid, "m4")) == [1, 2, 3]


def test_metric_upsert_a_bad_point_is_refused_with_mlflows_message_and_nothing_is_stored(observed, run, native_stack):
    client, created = run
    rid = created.info.run_id
    metrics = [{"key": "ok", "value": 1.0, "timestamp": 1, "step": 1},
               {"key": "../up", "value": 2.0, "timestamp": 1, "step": 1}]
    resp = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-batch", auth=native_stack.trainer_auth, timeout=60,
                         json={"run_id": rid, "metrics": metrics})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error_code"] == "INVALID_PARAMETER_VALUE" and "'metrics[1].name'" in resp.json()["message"]
    assert client.get_metric_history(rid, "ok") == []
    deleted = client.create_run(created.info.experiment_id).info.run_id
    client.delete_run(deleted)
    resp = requests.post(f"{observed.uri}/api/2.0/mlflow/runs/log-batch", auth=native_stack.trainer_auth, timeout=60,
                         json={"run_id": deleted, "metrics": metrics[:1]})
    assert resp.status_code == 400 and "must be in the 'active' state" in resp.json()["message"], resp.text
    assert client.get_metric_history(deleted, "ok") == []


def test_presigned_transfers_urls_name_the_public_endpoint_and_work(observed, run, native_stack):
    client, created = run
    repo = HttpArtifactRepository(
        f"{observed.uri}/api/2.0/mlflow-artifacts/artifacts/{created.info.experiment_id}/{created.info.run_id}/artifacts")
    created_upload = repo.create_multipart_upload("checkpoint/presigned.bin", num_parts=1)
    try:
        url = created_upload.credentials[0].url
        assert urlsplit(url).netloc == urlsplit(observed_public_endpoint(native_stack)).netloc
        assert requests.put(url, data=b"x" * 1024, timeout=60).status_code == 200  # signed for the host it names
    finally:
        repo.abort_multipart_upload("checkpoint/presigned.bin", created_upload.upload_id)


# -- refusal ----------------------------------------------------------------------------------------

# Loaded by every Python process of the server (through PYTHONPATH): once MLflow's artifact router
# is imported, its GET routes move to /api/2.1/..., where MLflow still serves them but the
# streaming download patch does not look: the route is genuinely not where the patch expects it,
# as happened when FastAPI 0.165 grouped routes differently.
MOVE_DOWNLOAD_ROUTES = textwrap.dedent('''
    import importlib.abc, importlib.util, sys

    class MoveDownloadRoutes(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mlflow.server.artifact_router":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_move(module):
                exec_module(module)
                router = module.artifact_router
                for route in [r for r in router.routes if "GET" in r.methods]:
                    router.routes.remove(route)
                    router.add_api_route(route.path.replace("/2.0/", "/2.1/"), route.endpoint, methods=["GET"])

            spec.loader.exec_module = exec_and_move
            return spec

    sys.meta_path.insert(0, MoveDownloadRoutes())
''')


@pytest.fixture
def hook_dir(tmp_path) -> Path:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(MOVE_DOWNLOAD_ROUTES)
    return hook


def test_server_refuses_to_start_when_a_patch_cannot_take_hold(native_stack, hook_dir, tmp_path):
    port = free_port()
    env = server_env(native_stack, port, process={"PYTHONPATH": str(hook_dir), "TMPDIR": str(tmp_path)})
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(ENTRYPOINT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    handle = Handle(proc.pid, psutil.Process(proc.pid).create_time())
    try:
        wait_until(lambda: proc.poll() is not None or healthy(f"http://127.0.0.1:{port}"),
                   what="the server's exit or start", timeout=300)
    finally:
        serving = proc.poll() is None
        if serving:
            stop_tree(handle)
    output = log.read_text()
    assert not serving, "the server started without the streaming download patch:\n" + output[-3000:]
    assert proc.returncode == 3, output[-3000:]  # gunicorn: "Worker failed to boot."
    assert f"patch streaming_download did not take hold on MLflow {mlflow.__version__}" in output, output[-3000:]
    assert "no GET route /api/2.0/mlflow-artifacts/artifacts/{artifact_path:path} found" in output
    assert "MLSTACK_ALLOW_UNPATCHED=streaming_download to run without it" in output


def test_server_runs_without_a_patch_only_when_allowed_and_says_so(native_stack, hook_dir, tmp_path):
    server = start_server(native_stack, tmp_path, settings={"MLSTACK_ALLOW_UNPATCHED": "streaming_download"},
                          process={"PYTHONPATH": str(hook_dir)})
    try:
        resp = requests.get(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                            auth=native_stack.trainer_auth, timeout=60)
        assert resp.status_code == 200, resp.text
        log = server.log.read_text()
        assert f"RUNNING WITHOUT PATCH streaming_download on MLflow {mlflow.__version__}" in log, tail(server.log, 40)
        assert [line for line in log.splitlines() if "RUNNING WITHOUT PATCH" in line and "streaming_download" not in line] == []
    finally:
        stop_tree(server.handle)
