"""`python -m mlstack.gc` (make stack-gc) on a real native stack of its own.

gc acts on the whole store, so these tests run it on a stack nobody else uses: on the session's
stack it would collect the other tests' deleted runs and leftovers. Each test builds its own runs
through the MLflow server, objects the way a crash or an eviction leaves them, then runs gc as the
make target does and reads the bucket and the database back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import psycopg2
import pytest
from mlflow import MlflowClient
from running_stack import environ_set, free_stack_ports

from mltrainer.lease import LEASE_TAG, Lease
from mltrainer.manifest import MANIFEST_NAME, Manifest, ManifestEntry
from mlstack.native.stack import Stack

REPO = Path(__file__).resolve().parents[2]


class GcStack:
    def __init__(self, state_dir: Path, env: dict[str, str]):
        self.state_dir, self.env = state_dir, env
        self.bucket = env["S3_BUCKET"]
        self.s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name="us-east-1",
                               aws_access_key_id=env["S3_ROOT_USER"], aws_secret_access_key=env["S3_ROOT_PASSWORD"])

    # -- the bucket

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def digests(self, prefix: str = "") -> dict[str, str]:
        """sha256 of every object under ``prefix``, read back."""
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                body = self.s3.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                out[o["Key"]] = hashlib.sha256(body).hexdigest()
        return out

    def start_upload(self, key: str) -> str:
        """A multipart upload with one part, never completed: what a killed client leaves."""
        upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"p" * 4096)
        return upload_id

    def uploads(self) -> set[str]:
        return {u["UploadId"] for u in self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])}

    # -- the database

    def sql(self, query: str, *params):
        conn = psycopg2.connect(host=self.env["DB_HOST"], port=int(self.env["DB_PORT"]), dbname=self.env["POSTGRES_DB"],
                                user=self.env["POSTGRES_USER"], password=self.env["POSTGRES_PASSWORD"])
        try:
            with conn, conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def run_rows(self, run_id: str) -> dict[str, int]:
        return {table: self.sql(f"SELECT count(*) FROM {table} WHERE run_uuid = %s", run_id)[0][0]
                for table in ("runs", "tags", "params", "metrics", "latest_metrics")}

    def database_dump(self) -> dict[str, list]:
        tables = ("experiments", "runs", "tags", "params", "metrics", "latest_metrics", "logged_models",
                  "model_versions")
        return {t: sorted(map(repr, self.sql(f"SELECT * FROM {t}"))) for t in tables}

    # -- gc, as `make stack-gc` runs it

    def gc(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "S3_"))}
        result = subprocess.run([sys.executable, "-m", "mlstack.gc", "--state-dir", str(self.state_dir), *args],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result


@pytest.fixture(scope="module")
def gc_stack():
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-gc-tests-"))
    with environ_set(free_stack_ports()):
        try:
            env = Stack(state_dir).up()
            yield GcStack(state_dir, env)
        finally:
            Stack(state_dir).down()
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(gc_stack):
    with environ_set({"MLFLOW_TRACKING_URI": gc_stack.env["MLFLOW_PUBLIC_URL"],
                      "MLFLOW_TRACKING_USERNAME": gc_stack.env["MLFLOW_ADMIN_USER"],
                      "MLFLOW_TRACKING_PASSWORD": gc_stack.env["MLFLOW_ADMIN_PASSWORD"]}):
        yield MlflowClient()


def lease(*, held: bool) -> str:
    """A trainer's lease tag: held (renewed now, for an hour) or released at the end of training."""
    return Lease(uuid.uuid4().hex, "gpu-host", 4242, time.time(), 3600.0, released=not held).to_tag()


def new_experiment(client: MlflowClient) -> str:
    return client.create_experiment(f"gc-{uuid.uuid4().hex[:8]}")


def new_run(client: MlflowClient, experiment_id: str, *, lease_tag: str | None, finished: bool) -> str:
    tags = {LEASE_TAG: lease_tag} if lease_tag else {}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_param(run_id, "lr", "0.1")
    client.log_metric(run_id, "loss", 0.5, step=1)
    if finished:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def log_files(client: MlflowClient, run_id: str, files: dict[str, bytes]) -> None:
    """Upload through the MLflow server (proxied), as the trainer does."""
    with tempfile.TemporaryDirectory() as tmp:
        for path, data in files.items():
            local = Path(tmp) / uuid.uuid4().hex / Path(path).name
            local.parent.mkdir(parents=True)
            local.write_bytes(data)
            folder = str(Path(path).parent)
            client.log_artifact(run_id, str(local), None if folder == "." else folder)


def manifest_for(store_path: str, files: dict[str, str], step: int) -> bytes:
    """A real mltrainer manifest whose files (path in checkpoint -> store path) may lie elsewhere."""
    entries = tuple(ManifestEntry(path=p, size=1, sha256="0" * 64, stored_at=at, crc32="00000000")
                    for p, at in files.items())
    return Manifest(step=step, metrics={}, store_path=store_path, created_at="2026-01-01T00:00:00Z",
                    files=entries).to_json().encode()


def prefix_of(client: MlflowClient, run_id: str) -> str:
    run = client.get_run(run_id)
    return f"artifacts/{run.info.experiment_id}/{run_id}/artifacts/"


def test_deleted_run_and_its_model_go_a_live_run_stays(gc_stack, client):
    exp = new_experiment(client)
    deleted = new_run(client, exp, lease_tag=lease(held=False), finished=True)
    log_files(client, deleted, {"checkpoints/step-00000001/model.bin": b"w" * 3000,
                                "checkpoints/step-00000001/" + MANIFEST_NAME: b"{}", "notes.txt": b"n"})
    model = client.create_logged_model(exp, source_run_id=deleted, name="model")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "MLmodel").write_text("flavors: {}\n")
        client.log_model_artifacts(model.model_id, tmp)
    model_prefix = f"artifacts/{exp}/models/{model.model_id}/"
    assert gc_stack.digests(model_prefix)

    # Live: RUNNING, its lease renewed just now; a checkpoint upload in flight (no manifest yet).
    live = new_run(client, exp, lease_tag=lease(held=True), finished=False)
    log_files(client, live, {"checkpoints/step-00000002/model.bin": b"l" * 2000, "notes.txt": b"m"})
    live_upload = gc_stack.start_upload(prefix_of(client, live) + "checkpoints/step-00000002/optimizer.pt")
    live_before = gc_stack.digests(prefix_of(client, live))

    deleted_prefix = prefix_of(client, deleted)
    client.delete_run(deleted)
    out = gc_stack.gc("--older-than", "0s").stdout

    assert gc_stack.digests(deleted_prefix) == {}
    assert gc_stack.digests(model_prefix) == {}
    assert gc_stack.run_rows(deleted) == dict.fromkeys(("runs", "tags", "params", "metrics", "latest_metrics"), 0)
    assert gc_stack.sql("SELECT count(*) FROM logged_models WHERE model_id = %s", model.model_id)[0][0] == 0
    assert gc_stack.digests(prefix_of(client, live)) == live_before
    assert live_upload in gc_stack.uploads()
    assert gc_stack.run_rows(live)["runs"] == 1
    assert f"run {deleted}" in out and f"logged model {model.model_id}" in out, out


def test_dry_run_changes_nothing(gc_stack, client):
    exp = new_experiment(client)
    deleted = new_run(client, exp, lease_tag=lease(held=False), finished=True)
    log_files(client, deleted, {"weights.bin": b"d" * 5000})
    client.delete_run(deleted)
    gone_run = uuid.uuid4().hex
    gc_stack.put(f"artifacts/{exp}/{gone_run}/artifacts/stray.bin", b"s" * 100)
    gc_stack.start_upload(f"artifacts/{exp}/{gone_run}/artifacts/big.bin")
    bucket, uploads, rows = gc_stack.digests(), gc_stack.uploads(), gc_stack.database_dump()

    out = gc_stack.gc("--older-than", "0s", "--dry-run").stdout

    assert f"would remove run {deleted}" in out and f"would remove orphaned objects run {gone_run}" in out, out
    assert "nothing was changed" in out
    assert gc_stack.digests() == bucket
    assert gc_stack.uploads() == uploads
    assert gc_stack.database_dump() == rows


def test_orphans_and_evicted_leftovers_go_owned_objects_stay(gc_stack, client):
    exp = new_experiment(client)
    # Objects no row owns: under a run id and an experiment id the database does not have.
    gone_run, gone_exp = uuid.uuid4().hex, "987654"
    orphans = {f"artifacts/{exp}/{gone_run}/artifacts/checkpoints/step-00000001/model.bin",
               f"artifacts/{gone_exp}/{uuid.uuid4().hex}/artifacts/x.bin"}
    for key in orphans:
        gc_stack.put(key, b"o" * 700)
    orphan_upload = gc_stack.start_upload(f"artifacts/{exp}/{gone_run}/artifacts/checkpoints/step-2/model.bin")

    # A trainer's finished run: step 1 complete; step 0 evicted (manifest gone) but one of its
    # files used by step 1 (dedup); step 3 never finished (the trainer was killed mid-upload).
    done = new_run(client, exp, lease_tag=lease(held=False), finished=True)
    step0, step1, step3 = (f"checkpoints/step-0000000{i}" for i in (0, 1, 3))
    log_files(client, done, {
        f"{step0}/tokenizer.json": b"t" * 300, f"{step0}/model.bin": b"0" * 900,
        f"{step1}/model.bin": b"1" * 900,
        f"{step1}/{MANIFEST_NAME}": manifest_for(step1, {"model.bin": f"{step1}/model.bin",
                                                         "tokenizer.json": f"{step0}/tokenizer.json"}, 1),
        f"{step3}/model.bin": b"3" * 400, "params.json": b"{}",
    })
    done_prefix = prefix_of(client, done)
    # The same shape in a run whose trainer holds its lease, and in runs that are no trainer's
    # (no lease), RUNNING or finished: gc cannot tell their uploads are over, or that
    # checkpoints/ follows the trainer's layout, so it leaves them.
    live = new_run(client, exp, lease_tag=lease(held=True), finished=False)
    foreign_running = new_run(client, exp, lease_tag=None, finished=False)
    foreign_finished = new_run(client, exp, lease_tag=None, finished=True)
    kept_runs = (live, foreign_running, foreign_finished)
    for run_id in kept_runs:
        log_files(client, run_id, {f"{step3}/model.bin": b"3" * 400})
    kept_before = {run_id: gc_stack.digests(prefix_of(client, run_id)) for run_id in kept_runs}

    out = gc_stack.gc("--older-than", "0s").stdout

    remaining = gc_stack.digests()
    assert not orphans & remaining.keys()
    assert orphan_upload not in gc_stack.uploads()
    assert {k[len(done_prefix):] for k in gc_stack.digests(done_prefix)} == {
        f"{step0}/tokenizer.json", f"{step1}/model.bin", f"{step1}/{MANIFEST_NAME}", "params.json"}
    for run_id, before in kept_before.items():
        assert gc_stack.digests(prefix_of(client, run_id)) == before, run_id
    assert f"orphaned objects run {gone_run}" in out and f"checkpoint leftovers {done}" in out, out


def test_age_threshold(gc_stack, client):
    exp = new_experiment(client)
    deleted = new_run(client, exp, lease_tag=lease(held=False), finished=True)
    log_files(client, deleted, {"weights.bin": b"a" * 1000})
    client.delete_run(deleted)
    young_orphan = f"artifacts/{exp}/{uuid.uuid4().hex}/artifacts/fresh.bin"
    gc_stack.put(young_orphan, b"f" * 10)
    deleted_prefix = prefix_of(client, deleted)

    gc_stack.gc("--older-than", "1h")
    assert set(gc_stack.digests(deleted_prefix)) == {deleted_prefix + "weights.bin"}
    assert gc_stack.run_rows(deleted)["runs"] == 1
    assert young_orphan in gc_stack.digests(young_orphan)

    # Deleted two hours ago (as the UI would have stamped it): now past the age.
    two_hours_ago = int((time.time() - 7200) * 1000)
    gc_stack.sql("UPDATE runs SET deleted_time = %s WHERE run_uuid = %s", two_hours_ago, deleted)
    gc_stack.gc("--older-than", "1h")
    assert gc_stack.digests(deleted_prefix) == {}
    assert gc_stack.run_rows(deleted)["runs"] == 0
    assert young_orphan in gc_stack.digests(young_orphan)  # written seconds ago: not past the age


def test_bad_age_is_refused_by_name(gc_stack):
    result = subprocess.run([sys.executable, "-m", "mlstack.gc", "--state-dir", str(gc_stack.state_dir),
                             "--older-than", "30 days"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--older-than '30 days' is not an age" in result.stderr
