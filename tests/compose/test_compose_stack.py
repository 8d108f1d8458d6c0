"""The compose stack run for real, as a user runs it: `make up S3=seaweedfs`, a teammate's client,
`docker compose run trainer`, `make down` / `make up`.

The tests run in file order and build on each other (one stack for the module): what the first
client logs must still be there after the restart near the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import textwrap
import time

import pytest
import requests

from conftest import FIGURES
from project import COMPOSE_FILES, LB_FILE, REPO, ComposeProject, log

from mltrainer.errors import EXIT_RESUME

sys.path.insert(0, str(REPO / "tests" / "integration"))

ARTIFACT_BYTES = 20 * 1000 * 1000
STACK_SERVICES = ("postgres", "s3", "mlflow")
TRAIN_TIMEOUT = 1200
STATE: dict[str, object] = {}


@pytest.fixture(scope="module")
def stack(project: ComposeProject) -> ComposeProject:
    started = time.monotonic()
    proc = project.make("up")
    FIGURES["first make up (builds the services image), seconds"] = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, f"make up failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    STATE["first_up"] = proc
    return project


def _health(container: dict) -> str | None:
    state = container["State"]
    health = state.get("Health") or state.get("Healthcheck") or {}
    return health.get("Status")


def test_make_up_brings_every_service_up_healthy(stack):
    for service in STACK_SERVICES:
        assert _health(stack.service_container(service)) == "healthy", service
    proc = STATE["first_up"]
    assert "created user" in proc.stdout + proc.stderr  # users-init, first run
    assert f"Tracking URI: {stack.values['MLFLOW_PUBLIC_URL']}" in proc.stdout


def test_the_server_logs_no_permission_error(stack):
    logs = stack.compose("logs", "--no-color", "mlflow")
    text = logs.stdout + logs.stderr
    assert "listening" in text.lower() or "booting worker" in text.lower(), text[-2000:]
    assert "Permission denied" not in text and "Control server error" not in text, text[-3000:]


def test_second_make_up_is_idempotent(stack):
    started = time.monotonic()
    proc = stack.make("up")
    FIGURES["make up on a running stack, seconds"] = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "updated password of user" in proc.stdout + proc.stderr
    init = [c for c in stack.containers(all_=True)
            if c["Config"]["Labels"].get("com.docker.compose.service") == "storage-init"]
    assert init and all(c["State"]["ExitCode"] == 0 for c in init)


CLIENT = textwrap.dedent("""
    import hashlib, json, os, sys, tempfile
    import mlflow
    from mlflow import MlflowClient

    mode, path = sys.argv[1], sys.argv[2]
    client = MlflowClient()
    if mode == "log":
        mlflow.set_experiment("compose-test")
        with mlflow.start_run(run_name="teammate-client") as run:
            mlflow.log_params({"lr": 0.01, "layers": 4})
            for step in range(10):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.log_artifact(path, artifact_path="blobs")
        print(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}))
    else:
        run_id = mode
        run = client.get_run(run_id)
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
        local = client.download_artifacts(run_id, "blobs/" + os.path.basename(path), tempfile.mkdtemp())
        digest = hashlib.sha256(open(local, "rb").read()).hexdigest()
        print(json.dumps({"params": run.data.params, "history": sorted(history), "sha256": digest,
                          "status": run.info.status}))
""")


def _client(stack, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT, *args], env=env or stack.client_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_teammate_logs_a_run_through_the_server(stack, tmp_path_factory):
    blob = tmp_path_factory.mktemp("blob") / "weights.bin"
    blob.write_bytes(os.urandom(ARTIFACT_BYTES))
    logged = _client(stack, "log", str(blob))
    back = _client(stack, logged["run_id"], str(blob))
    assert back["params"] == {"lr": "0.01", "layers": "4"}
    assert back["history"] == [[step, 1.0 / (step + 1)] for step in range(10)]
    assert back["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    key = f"artifacts/{logged['experiment_id']}/{logged['run_id']}/artifacts/blobs/weights.bin"
    head = stack.s3_root().head_object(Bucket=stack.values["S3_BUCKET"], Key=key)
    assert head["ContentLength"] == ARTIFACT_BYTES
    STATE["client_run"] = {**logged, **back, "blob": str(blob)}


def test_credentials_and_host_are_checked(stack):
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=10).status_code == 401
    trainer = (stack.values["MLFLOW_TRAINER_USER"], stack.values["MLFLOW_TRAINER_PASSWORD"])
    assert requests.get(url, auth=(trainer[0], "wrong"), timeout=10).status_code == 401
    assert requests.get(url, auth=trainer, timeout=10).status_code == 200
    foreign = requests.get(url, auth=trainer, headers={"Host": "evil.example.com"}, timeout=10)
    assert foreign.status_code == 403


def test_an_admin_gives_a_teammate_an_account(stack):
    proc = stack.make("compose-user", "NAME=alice")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    password = next(line.split("=", 1)[1].strip() for line in proc.stdout.splitlines()
                    if line.strip().startswith("export MLFLOW_TRACKING_PASSWORD="))
    assert f"export MLFLOW_TRACKING_URI={stack.values['MLFLOW_PUBLIC_URL']}" in proc.stdout
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, auth=("alice", password), timeout=10).status_code == 200
    users = requests.get(f"{stack.tracking_uri}/api/2.0/mlflow/users/list", auth=("alice", password), timeout=10)
    assert users.status_code == 403, "a non-admin must not list users"
    again = stack.make("compose-user", "NAME=alice")
    assert again.returncode == 0 and "already exists" in again.stdout and password not in again.stdout


def test_no_port_is_published_beyond_loopback(stack):
    published = []
    for container in stack.containers():
        for port, bindings in (container["NetworkSettings"].get("Ports") or {}).items():
            for binding in bindings or []:
                published.append((container["Name"], port, binding["HostIp"]))
    assert published, "the MLflow and S3 API ports are published"
    assert {ip for _, _, ip in published} == {"127.0.0.1"}, published
    services = {name for name, _, _ in published}
    assert len(services) == 2, published  # mlflow and the S3 API only


PROBE = textwrap.dedent("""
    # Run inside the compose network: what a compromised or curious container could reach on s3.
    import json, socket, ssl, sys

    def first_line(sock):
        sock.settimeout(5)
        sock.sendall(b"GET /buckets/ HTTP/1.1\\r\\nHost: s3\\r\\nConnection: close\\r\\n\\r\\n")
        data = b""
        try:
            while len(data) < 200:
                chunk = sock.recv(200)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            return f"no answer ({exc.__class__.__name__})"
        return data.split(b"\\r\\n", 1)[0].decode("latin-1") or "closed"

    out = {}
    for port in map(int, sys.argv[1:]):
        try:
            plain = first_line(socket.create_connection(("s3", port), timeout=5))
        except OSError as exc:
            out[port] = {"connect": f"refused ({exc.__class__.__name__})"}
            continue
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            tls = first_line(ctx.wrap_socket(socket.create_connection(("s3", port), timeout=5), server_hostname="s3"))
        except (OSError, ssl.SSLError) as exc:
            tls = f"refused ({exc.__class__.__name__})"
        out[port] = {"plain": plain, "tls": tls}
    print(json.dumps(out))
""")


def _listening_ports(stack, service: str) -> dict[int, str]:
    """TCP ports a service's container listens on, from its kernel tables: {port: bound address}."""
    container = stack.service_container(service)["Id"]
    table = stack.engine.cli("exec", container, "cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
    ports = {}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # LISTEN
            address, port = fields[1].rsplit(":", 1)
            ports[int(port, 16)] = address
    return ports


def test_only_the_s3_api_answers_inside_the_network(stack):
    """Every port the S3 server listens on, tried from another container of the stack."""
    ports = _listening_ports(stack, "s3")
    assert 9000 in ports and len(ports) >= 6, ports  # S3 plus master, volume, filer and their gRPC
    mlflow = stack.service_container("mlflow")["Id"]
    proc = stack.engine.cli("exec", mlflow, "python", "-c", PROBE, *map(str, sorted(ports)))
    seen = {int(k): v for k, v in json.loads(proc.stdout).items()}
    log(f"s3 ports from inside the network: {seen}")
    FIGURES["s3 ports probed from the network"] = seen
    assert seen[9000]["plain"].startswith("HTTP/1.1 403"), seen[9000]  # unsigned S3: refused
    for port, answer in seen.items():
        if port == 9000:
            continue
        served = [v for v in answer.values() if v.startswith(("HTTP/1.0 2", "HTTP/1.1 2", "HTTP/1.0 3", "HTTP/1.1 3"))]
        assert not served, f"port {port} of the S3 server answers without credentials: {answer}"


# -- the trainer container ----------------------------------------------------------------------


def _trainer(stack, *args: str, detach_name: str | None = None, timeout: float = TRAIN_TIMEOUT):
    trainer_args = ("trainer", "--config", "configs/tiny.yaml", "--set", "experiment.name=compose-trainer", *args)
    if detach_name:
        return stack.compose("--profile", "trainer", "run", "-d", "--name", detach_name, *trainer_args,
                             timeout=timeout, check=False)
    return stack.run_once("--profile", "trainer", "run", *trainer_args, timeout=timeout, check=False)


def _client_api():
    from mlflow import MlflowClient

    return MlflowClient()


@pytest.fixture
def as_teammate(stack, monkeypatch):
    for key in list(os.environ):
        if key.startswith(("AWS_", "MLFLOW_", "S3_")):
            monkeypatch.delenv(key, raising=False)
    for key, value in stack.client_env().items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    yield _client_api()
    mlflow.set_tracking_uri(None)


def _stored(client, run_id: str):
    from mltrainer.store import list_checkpoints

    return list_checkpoints(client, run_id)


def test_trainer_container_trains_on_cpu(stack, as_teammate):
    started = time.monotonic()
    built = stack.make("trainer-image", timeout=TRAIN_TIMEOUT)
    FIGURES["trainer image build, seconds"] = round(time.monotonic() - started, 1)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    proc = _trainer(stack, "--set", "log_final_model=true")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Bad git executable" not in output
    run_id = next(line.split("(")[1].split(")")[0] for line in output.splitlines()
                  if line.startswith("Run ") and "finished at step" in line)
    run = as_teammate.get_run(run_id)
    assert run.info.status == "FINISHED"
    # The commit `make trainer-image` baked in (HEAD when it built), a commit of this repository.
    env = stack.engine.cli("image", "inspect", "--format", "{{json .Config.Env}}", f"mlstack-trainer:{stack.tag}")
    baked = next(v.split("=", 1)[1] for v in json.loads(env.stdout) if v.startswith("MLTRAINER_GIT_COMMIT="))
    assert run.data.tags.get("mlflow.source.git.commit") == baked
    assert subprocess.run(["git", "cat-file", "-e", f"{baked}^{{commit}}"], cwd=REPO).returncode == 0, baked
    rows = _stored(as_teammate, run_id)
    complete = [r for r in rows if r.state == "complete"]
    # save_last_k: 2 and save_top_k: 1 keep steps 16 and 20, and the best when it is another.
    steps = [r.step for r in complete]
    assert steps[-2:] == [16, 20] and len(steps) <= 3, [(r.store_path, r.state) for r in rows]
    assert run.data.tags["checkpoint.latest"] == complete[-1].store_path
    assert run.data.tags["checkpoint.best"] in {r.store_path for r in complete}
    STATE["trainer_steps"] = steps
    assert any(m.model_id for m in as_teammate.search_logged_models(experiment_ids=[run.info.experiment_id])
               if m.source_run_id == run_id), "the final model is logged"
    STATE["trainer_run"] = run_id
    # Resumed in a second container, a FINISHED run says so and changes nothing.
    again = _trainer(stack, "--resume", run_id)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "already finished" in again.stdout + again.stderr
    assert as_teammate.get_run(run_id).data.tags == run.data.tags
    assert [r.step for r in _stored(as_teammate, run_id) if r.state == "complete"] == steps


def test_a_failing_trainer_container_exits_with_its_error_code(stack):
    # podman's Docker API reports 0 for `compose run --rm` whatever the container exited with; the
    # Makefile's one-shot jobs and these tests run through infra/compose-run.sh so a failure shows.
    proc = _trainer(stack, "--resume", "0" * 32)
    assert proc.returncode == EXIT_RESUME, (proc.stdout + proc.stderr)[-3000:]
    assert "resume error" in proc.stderr and "0" * 32 in proc.stderr, proc.stderr[-3000:]
    left = [c["Name"] for c in stack.containers(all_=True)
            if c["Config"]["Labels"].get("com.docker.compose.service") == "trainer"]
    assert not left, f"the one-shot trainer container is removed: {left}"


def test_trainer_resumes_a_killed_run_in_a_second_container(stack, as_teammate):
    name = f"{stack.name}-victim"
    # Slow enough to be stopped between its first stored checkpoint and its end; a short lease so
    # the killed trainer's run is free soon after.
    proc = _trainer(stack, "--set", "training.max_steps=400", "--set", "training.save_steps=40",
                    "--set", "training.eval_steps=40", "--set", "tracking.lease_seconds=5", detach_name=name)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = None
    deadline = time.monotonic() + TRAIN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            runs = as_teammate.search_runs(
                [as_teammate.get_experiment_by_name("compose-trainer").experiment_id],
                filter_string="attributes.status = 'RUNNING'", max_results=5)
            latest = [r for r in runs if r.data.tags.get("checkpoint.latest")]
            if latest:
                run_id = latest[0].info.run_id
                break
            time.sleep(1)
    finally:
        killed_proc = stack.engine.cli("kill", name, check=False)
        victim_log = stack.engine.cli("logs", name, check=False)
        stack.engine.cli("rm", "-f", name, check=False)
    victim_said = f"kill: {killed_proc.returncode} {killed_proc.stderr[-500:]}\nvictim's log:\n{victim_log.stdout[-3000:]}{victim_log.stderr[-3000:]}"
    assert killed_proc.returncode == 0, victim_said
    assert run_id, "the detached trainer stored no checkpoint"
    killed = as_teammate.get_run(run_id)
    assert killed.info.status == "RUNNING"
    killed_step = max(r.step for r in _stored(as_teammate, run_id) if r.state == "complete")
    assert killed_step < 400
    time.sleep(6)  # the killed trainer's 5 s lease runs out
    proc = _trainer(stack, "--resume", run_id, "--set", "training.max_steps=400", "--set", "training.save_steps=40",
                    "--set", "training.eval_steps=40", "--set", "tracking.lease_seconds=5")
    resume_said = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, resume_said
    resumed = as_teammate.get_run(run_id)
    assert resumed.info.status == "FINISHED", f"{resume_said}\n{victim_said}"
    steps = [m.step for m in as_teammate.get_metric_history(run_id, "loss")]
    assert max(steps) >= 400 - 10 and len(steps) == len(set(steps)), "steps continue, none logged twice"
    assert max(r.step for r in _stored(as_teammate, run_id) if r.state == "complete") == 400


# -- restart ------------------------------------------------------------------------------------


def test_make_down_stops_everything_and_make_up_keeps_the_data(stack, as_teammate):
    started = time.monotonic()
    proc = stack.make("down")
    FIGURES["make down, seconds"] = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stack.containers() == [], "make down leaves no container running"
    started = time.monotonic()
    proc = stack.make("up")
    FIGURES["make up from stopped (images built), seconds"] = round(time.monotonic() - started, 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = STATE["client_run"]
    after = _client(stack, before["run_id"], before["blob"])
    assert after["params"] == before["params"] and after["history"] == before["history"]
    assert after["sha256"] == before["sha256"]
    run = as_teammate.get_run(STATE["trainer_run"])
    assert run.info.status == "FINISHED" and [r.step for r in _stored(as_teammate, STATE["trainer_run"])
                                              if r.state == "complete"] == STATE["trainer_steps"]


# -- backup and restore -------------------------------------------------------------------------

TABLE_DIGEST = "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} AS t;"


def _database_digests(target) -> dict[str, dict[str, str]]:
    """A checksum of every table of both databases, read inside the postgres container. The
    stack's own accounts get their password hashes anew at restore: users is compared without them."""
    from mlstack.backup import postgres

    own = ", ".join(postgres.quote_literal(u) for u in (target.admin_user, target.trainer_user))
    out = {}
    for role, db in target.databases.by_role().items():
        tables = [row[0] for row in postgres.query(
            target, db, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                        "AND table_type = 'BASE TABLE' ORDER BY 1;")]
        out[role] = {}
        for table in tables:
            source = (f"(SELECT username, is_admin, CASE WHEN username IN ({own}) THEN '' ELSE password_hash END "
                      f"FROM users)" if table == "users" else postgres.quote_ident(table))
            out[role][table] = postgres.query(target, db, TABLE_DIGEST.format(table=source))[0][0]
    return out


def _bucket_digests(stack) -> dict[str, str]:
    s3, bucket, out = stack.s3_root(), stack.values["S3_BUCKET"], {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = hashlib.sha256(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()).hexdigest()
    return out


def test_make_backup_then_make_restore_onto_a_wiped_stack(stack, tmp_path_factory):
    """make backup, `docker compose down --volumes`, make up, make restore: the same rows and objects."""
    from mlstack.backup.targets import ComposeTarget

    blob = tmp_path_factory.mktemp("backup-blob") / "weights.bin"
    blob.write_bytes(os.urandom(ARTIFACT_BYTES // 4))
    logged = _client(stack, "log", str(blob))
    person = stack.make("compose-user", "NAME=carol")
    assert person.returncode == 0, person.stdout[-2000:] + person.stderr[-2000:]
    carol = next(line.split("=", 1)[1].strip() for line in person.stdout.splitlines()
                 if line.strip().startswith("export MLFLOW_TRACKING_PASSWORD="))
    target = ComposeTarget(" ".join(["docker", "compose", "--env-file", str(stack.env_file),
                                     *(a for f in COMPOSE_FILES for a in ("-f", f))]), stack.env_file, stack.env)
    rows_before, objects_before = _database_digests(target), _bucket_digests(stack)
    backups = tmp_path_factory.mktemp("backups")
    started = time.monotonic()
    made = stack.make("backup", f"BACKUP_ROOT={backups}")
    FIGURES["make backup, seconds"] = round(time.monotonic() - started, 1)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    (backup,) = backups.iterdir()

    stack.compose("down", "--volumes", "--timeout", "30", timeout=300)
    up = stack.make("up")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    started = time.monotonic()
    restored = stack.make("restore", f"BACKUP={backup}")
    FIGURES["make restore, seconds"] = round(time.monotonic() - started, 1)
    assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]

    assert _database_digests(target) == rows_before
    assert _bucket_digests(stack) == objects_before
    back = _client(stack, logged["run_id"], str(blob))
    assert back["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert back["params"] == {"lr": "0.01", "layers": "4"} and len(back["history"]) == 10
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, auth=("carol", carol), timeout=10).status_code == 200
    again = stack.make("restore", f"BACKUP={backup}")
    assert again.returncode != 0 and "is not empty, nothing was restored" in again.stderr, again.stderr[-2000:]


def test_figures_and_disk_use(stack):
    mlflow = stack.service_container("mlflow")
    stats = stack.engine.cli("stats", "--no-stream", "--format", "{{.MemUsage}}", mlflow["Id"], check=False)
    FIGURES["services container idle memory"] = stats.stdout.strip() or stats.stderr.strip()[-200:]
    user = stack.engine.cli("image", "inspect", "--format", "{{.Config.User}}", f"mlstack-trainer:{stack.tag}")
    assert user.stdout.strip() == "trainer", "the trainer image runs as a non-root user"
    for image in (f"mlstack-services:{stack.tag}", f"mlstack-trainer:{stack.tag}"):
        size = stack.engine.cli("image", "inspect", "--format", "{{.Size}}", image, check=False).stdout.strip()
        FIGURES[f"image {image.split(':')[0]} size, MB"] = round(int(size) / 1e6) if size.isdigit() else size
    volume = f"{stack.name}_s3-data"
    mountpoint = stack.engine.cli("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
    used = int(subprocess.run(["du", "-s", "-B1", mountpoint], capture_output=True, text=True, check=True).stdout.split()[0])
    FIGURES["S3 volume disk use after the test, MB"] = round(used / 1e6, 1)
    log(f"S3 volume {volume}: {used / 1e6:.1f} MB")
    assert used < 1e9, f"the S3 volume holds {used / 1e9:.2f} GB after a test that stored a few MB"


def test_make_up_lb_puts_replicas_behind_haproxy_with_tls_only(stack, tmp_path):
    """`make up LB=1`, the documented way to expose the stack: teammates reach it over TLS alone."""
    # The balancer's network has an address plan of its own, so the plain stack's network goes first.
    down = stack.make("down")
    assert down.returncode == 0, down.stderr[-3000:]
    started = time.monotonic()
    up = stack.make("up", "LB=1")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    FIGURES["make up LB=1 from stopped, seconds"] = round(time.monotonic() - started, 1)
    printed = re.search(r"SHA-256 fingerprint: ([0-9A-Fa-f:]{95})", up.stdout)
    assert printed, f"make up LB=1 prints the certificate's fingerprint:\n{up.stdout[-2000:]}"

    port = int(stack.values["MLFLOW_PUBLISHED_PORT"])
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest() == printed[1].replace(":", "").lower()
    cert = tmp_path / "stack-ca.pem"
    cert.write_text(pem)
    base = f"https://localhost:{port}"
    with pytest.raises(requests.exceptions.ConnectionError):  # no clear-text HTTP on the published port
        requests.get(f"http://localhost:{port}/health", timeout=10)
    # HAProxy finds the replicas through the network's DNS and its first health checks: seconds.
    deadline, health = time.monotonic() + 90, None
    while time.monotonic() < deadline and health != 200:
        time.sleep(1)
        health = requests.get(f"{base}/health", verify=str(cert), timeout=30).status_code
    lb_log = stack.compose("logs", "--no-log-prefix", "--tail", "30", "lb", check=False,
                           extra_files=(LB_FILE,))
    assert health == 200, f"HAProxy found no healthy replica in 90 s:\n{lb_log.stdout[-3000:]}{lb_log.stderr[-1000:]}"
    FIGURES["make up LB=1 until HAProxy serves, seconds"] = round(time.monotonic() - started, 1)
    url = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    trainer = (stack.values["MLFLOW_TRAINER_USER"], stack.values["MLFLOW_TRAINER_PASSWORD"])
    assert requests.get(url, verify=str(cert), timeout=30).status_code == 401
    assert requests.get(url, auth=trainer, verify=str(cert), timeout=30).status_code == 200

    services = [c["Config"]["Labels"]["com.docker.compose.service"] for c in stack.containers()]
    assert services.count("mlflow") == 2, services  # STACK_SERVERS' default
    published = {(c["Config"]["Labels"]["com.docker.compose.service"], binding["HostPort"])
                 for c in stack.containers()
                 for port_name, bindings in (c["NetworkSettings"].get("Ports") or {}).items() for binding in bindings or []}
    assert ("lb", str(port)) in published and not any(svc == "mlflow" for svc, _ in published), published

    # A teammate's client, trusting the printed certificate: the earlier run is there, a new one is stored.
    env = {**stack.client_env(), "MLFLOW_TRACKING_URI": base, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(cert)}
    earlier = STATE["client_run"]
    logged = _client(stack, "log", earlier["blob"], env=env)
    for run_id in (earlier["run_id"], logged["run_id"]):
        back = _client(stack, run_id, earlier["blob"], env=env)
        assert (back["sha256"], back["history"]) == (earlier["sha256"], earlier["history"])
