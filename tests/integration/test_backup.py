"""Backup and restore of a real native stack (make stack-backup / make stack-restore).

A stack of its own (not the session's): runs with params, metrics and artifacts, a trainer run of
configs/tiny.yaml with checkpoints and a registered model, two people with permissions, and a run
whose checkpoints are half-written. It is backed up, wiped (stopped, its state directory deleted),
started anew with new secrets, and restored: every row and every object compares equal, logins
work, the trainer resumes from a restored checkpoint, and no half-written checkpoint comes back
looking complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from running_stack import STACK_PORT_VARS, RunningStack, environ_set, free_stack_ports
from trainer_support import (
    artifact_prefix, finish, object_digests, read_object, run_cli, start_train, train, trainer_client, trainer_env,
)

from mlstack.native.stack import Stack

REPO = Path(__file__).resolve().parents[2]
PEOPLE = {"alice": "alice-password-0123", "bob": "bob-password-456789"}
MODEL = "backup-model"
HALF = {  # the half-written run's checkpoint folders and what each holds in the source bucket
    "checkpoints/step-00000016": "manifest, a listed file missing",
    "checkpoints/step-00000020": "whole",
    "checkpoints/step-00000024": "files, no manifest yet",
    "checkpoints/step-00000028": "manifest, a listed file with other bytes of the same size",
}


def _start(state_dir: Path) -> RunningStack:
    """A native stack on free ports (given through the environment only while it starts)."""
    with environ_set(free_stack_ports()):
        stack = Stack(state_dir)
        return RunningStack(stack, stack.up())


def backup_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m mlstack.backup`` as make runs it: no port variables of another stack, no .env."""
    env = {k: v for k, v in os.environ.items() if k not in STACK_PORT_VARS}
    return subprocess.run([sys.executable, "-m", "mlstack.backup", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def rows(stack: RunningStack) -> dict[str, dict[str, list]]:
    """Every row of every table of both databases, comparable across stacks.

    The stack's own two accounts get the target's passwords at restore (mlstack.backup.restore),
    so their password hashes are left out; every other column of every row is compared.
    """
    import psycopg2

    env, own = stack.env, {stack.env["MLFLOW_ADMIN_USER"], stack.env["MLFLOW_TRAINER_USER"]}
    out = {}
    for role, db in (("tracking", env["POSTGRES_DB"]), ("auth", env["MLFLOW_AUTH_DB"])):
        conn = psycopg2.connect(host="127.0.0.1", port=int(env["DB_PORT"]), user=env["POSTGRES_USER"],
                                password=env["POSTGRES_PASSWORD"], dbname=db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                            "AND table_type = 'BASE TABLE' ORDER BY 1")
                tables = [t for (t,) in cur.fetchall()]
                out[role] = {}
                for table in tables:
                    cur.execute(f'SELECT * FROM "{table}"')
                    names = [d.name for d in cur.description]
                    found = []
                    for row in cur.fetchall():
                        record = {n: bytes(v) if isinstance(v, memoryview) else v for n, v in zip(names, row)}
                        if role == "auth" and table == "users" and record["username"] in own:
                            record.pop("password_hash")
                        found.append(repr(sorted(record.items())))
                    out[role][table] = sorted(found)
        finally:
            conn.close()
    return out


def bucket_digests(stack: RunningStack) -> dict[str, str]:
    return object_digests(stack, "")


# -- the source stack's contents ------------------------------------------------------------------


def _people_and_permissions(stack: RunningStack, experiment_id: str) -> None:
    api, admin = f"{stack.uri}/api/2.0/mlflow", stack.admin_auth
    for name, password in PEOPLE.items():
        r = requests.post(f"{api}/users/create", json={"username": name, "password": password}, auth=admin, timeout=30)
        assert r.status_code == 200, r.text
    grants = (("alice", "experiment", experiment_id, "EDIT"), ("bob", "registered_model", MODEL, "MANAGE"))
    for username, resource_type, resource_id, permission in grants:
        r = requests.post(f"{stack.uri}/api/3.0/mlflow/users/permissions/grant", auth=admin, timeout=30,
                          json={"username": username, "resource_type": resource_type, "resource_id": resource_id,
                                "permission": permission})
        assert r.status_code == 200, r.text


def _client_runs(client, tmp: Path) -> str:
    experiment_id = client.create_experiment("backup-client")
    for i in range(3):
        run = client.create_run(experiment_id, run_name=f"client-{i}", tags={"team": "nlp"})
        run_id = run.info.run_id
        for key, value in {"lr": 0.01 * (i + 1), "layers": 4 + i}.items():
            client.log_param(run_id, key, value)
        for step in range(20):
            client.log_metric(run_id, "loss", 1.0 / (step + 1 + i), step=step)
        blob = tmp / f"blob-{i}.bin"
        blob.write_bytes(os.urandom(300_000 + i))
        client.log_artifact(run_id, str(blob), artifact_path="blobs")
        client.set_terminated(run_id, "FINISHED")
    return experiment_id


def _half_written_checkpoints(stack: RunningStack, client, source_run: str) -> str:
    """A run holding copies of ``source_run``'s checkpoints in each state of HALF."""
    run = client.create_run(client.get_run(source_run).info.experiment_id, run_name="half-written")
    src, dst = artifact_prefix(client, source_run), artifact_prefix(client, run.info.run_id)
    s3, bucket = stack.s3_root(), stack.bucket

    def put(key: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=data)

    for key in stack.bucket_keys(src + "checkpoints/"):
        put(dst + key[len(src):], read_object(stack, key))
    # step 24: a checkpoint in flight, every file there and its manifest not yet.
    manifest20 = json.loads(read_object(stack, dst + "checkpoints/step-00000020/manifest.json"))
    for entry in manifest20["files"]:
        if entry["stored_at"].startswith("checkpoints/step-00000020/"):
            put(dst + "checkpoints/step-00000024/" + entry["path"], read_object(stack, dst + entry["stored_at"]))
    # step 28: step 20 under another name, one file of its own replaced by other bytes of the same size.
    moved = json.loads(json.dumps(manifest20).replace("checkpoints/step-00000020/", "checkpoints/step-00000028/"))
    moved["store_path"] = "checkpoints/step-00000028"
    own = [e for e in moved["files"] if e["stored_at"].startswith("checkpoints/step-00000028/")]
    for entry in own:
        data = read_object(stack, dst + entry["stored_at"].replace("step-00000028", "step-00000020"))
        put(dst + entry["stored_at"], data if entry is not own[0] else bytes(b ^ 0xFF for b in data))
    put(dst + "checkpoints/step-00000028/manifest.json", json.dumps(moved).encode())
    # step 16: its manifest is there and the weights it lists are gone.
    manifest16 = json.loads(read_object(stack, dst + "checkpoints/step-00000016/manifest.json"))
    weights = next(e for e in manifest16["files"] if e["path"].endswith(".safetensors"))
    s3.delete_object(Bucket=bucket, Key=dst + weights["stored_at"])
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def _checkpoint_states(client, run_id: str) -> dict[str, str]:
    from mltrainer.store import list_checkpoints

    return {row.store_path: row.state for row in list_checkpoints(client, run_id, verify=True) if row.store_path in HALF}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Source stack filled, backed up, wiped, started anew and restored; what each side held."""
    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-backup-"))
    work = tmp_path_factory.mktemp("backup")
    stack = _start(state_dir)
    try:
        trained = train(stack, work / "out", "backup-train", "log_final_model=true", f"registered_model.name={MODEL}")
        with trainer_client(stack) as client:
            client_experiment = _client_runs(client, work)
            half_run = _half_written_checkpoints(stack, client, trained.run_id)
            half_states_before = _checkpoint_states(client, half_run)
        _people_and_permissions(stack, client_experiment)
        before = {"rows": rows(stack), "objects": bucket_digests(stack), "half_prefix": None}
        with trainer_client(stack) as client:
            before["half_prefix"] = artifact_prefix(client, half_run)

        made = backup_cli("create", f"--state-dir={state_dir}", "--env-file=", f"--into={work / 'backups'}")
        assert made.returncode == 0, made.stdout + made.stderr
        (backup,) = (work / "backups").iterdir()

        stack.stack.down()  # wiped: nothing of the old stack is left, its secrets included
        shutil.rmtree(state_dir)
        stack = _start(state_dir)
        restored = backup_cli("restore", str(backup), f"--state-dir={state_dir}", "--env-file=")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        yield {"stack": stack, "before": before, "backup": backup, "trained": trained, "half_run": half_run,
               "half_states_before": half_states_before, "made": made, "restored": restored, "work": work}
    finally:
        Stack(state_dir).down()
        shutil.rmtree(state_dir, ignore_errors=True)


def _half_manifest(prefix: str, folder: str) -> str:
    return f"{prefix}{folder}/manifest.json"


def test_every_row_and_every_object_comes_back(round_trip):
    stack, before = round_trip["stack"], round_trip["before"]
    assert rows(stack) == before["rows"]
    assert len(before["rows"]["tracking"]["runs"]) == 5  # trainer, three client runs, half-written
    after = bucket_digests(stack)
    prefix = before["half_prefix"]
    left_out = {_half_manifest(prefix, f) for f, what in HALF.items() if what.startswith("manifest, ")}
    # Every object, byte for byte, but the two manifests of checkpoints that are not whole.
    assert after == {k: v for k, v in before["objects"].items() if k not in left_out}
    assert left_out <= set(before["objects"])
    manifest = json.loads((round_trip["backup"] / "manifest.json").read_text())
    assert {d["key"] for d in manifest["bucket"]["checkpoint_manifests_left_out"]} == left_out
    assert manifest["mlflow_version"] and manifest["databases"]["tracking"]["schema_revision"]
    assert manifest["databases"]["auth"]["schema_revision"]


def test_logins_work_and_permissions_hold(round_trip):
    stack = round_trip["stack"]
    api = f"{stack.uri}/api/2.0/mlflow"
    for who in (*PEOPLE.items(), stack.admin_auth, stack.trainer_auth):
        r = requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=who, timeout=30)
        assert r.status_code == 200, (who[0], r.status_code, r.text[:300])
    assert requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=("alice", "wrong-password-123"),
                        timeout=30).status_code == 401
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "backup-client"},
                              auth=stack.admin_auth, timeout=30).json()["experiment"]
    for username, resource_type, resource_id, permission in (
            ("alice", "experiment", experiment["experiment_id"], "EDIT"), ("bob", "registered_model", MODEL, "MANAGE")):
        perm = requests.get(f"{stack.uri}/api/3.0/mlflow/users/permissions/get", auth=stack.admin_auth, timeout=30,
                            params={"username": username, "resource_type": resource_type, "resource_id": resource_id})
        assert perm.status_code == 200 and perm.json()["permission"] == permission, perm.text[:300]
    model = requests.get(f"{api}/registered-models/get", params={"name": MODEL}, auth=("bob", PEOPLE["bob"]), timeout=30)
    assert model.status_code == 200 and model.json()["registered_model"]["latest_versions"], model.text[:500]


def test_no_restored_checkpoint_looks_complete_when_it_is_not(round_trip):
    stack = round_trip["stack"]
    # In the source, steps 16 and 28 claim to be complete: 16 lacks its weights (--verify sees it),
    # 28 has other bytes of the right size (only a resume's checksum would notice).
    before = round_trip["half_states_before"]
    assert before == {"checkpoints/step-00000016": "damaged", "checkpoints/step-00000020": "complete",
                      "checkpoints/step-00000024": "incomplete", "checkpoints/step-00000028": "complete"}, before
    with trainer_client(stack) as client:
        after = _checkpoint_states(client, round_trip["half_run"])
    assert after == {"checkpoints/step-00000016": "incomplete", "checkpoints/step-00000020": "complete",
                     "checkpoints/step-00000024": "incomplete", "checkpoints/step-00000028": "incomplete"}, after
    said = round_trip["made"].stdout
    assert "left out " + _half_manifest(round_trip["before"]["half_prefix"], "checkpoints/step-00000016") in said


def test_a_run_resumes_from_a_restored_checkpoint(round_trip):
    stack, run_id = round_trip["stack"], round_trip["trained"].run_id
    with trainer_client(stack) as client:
        client.set_terminated(run_id, "FAILED")  # as if its trainer had died after its last checkpoint
    done = run_cli(stack, "--config", "configs/tiny.yaml", "--resume", run_id,
                   "--set", f"output_root={round_trip['work'] / 'resumed'}", "--set", "log_final_model=false",
                   "--set", "training.max_steps=24", env=trainer_env(stack), timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Downloading checkpoints/step-00000020" in output
    with trainer_client(stack) as client:
        assert client.get_run(run_id).info.status == "FINISHED"
        assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 24


def test_restore_refuses_a_stack_that_is_not_empty(round_trip):
    stack = round_trip["stack"]
    state_dir = stack.stack.state_dir
    rows_now = rows(stack)
    again = backup_cli("restore", str(round_trip["backup"]), f"--state-dir={state_dir}", "--env-file=")
    assert again.returncode == 1
    assert "is not empty, nothing was restored" in again.stderr and "run(s)" in again.stderr, again.stderr
    assert "user(s) alice, bob" in again.stderr and "objects in bucket" in again.stderr
    assert rows(stack) == rows_now


def test_restore_refuses_another_mlflow_version_and_a_damaged_backup(round_trip, tmp_path):
    state_dir = round_trip["stack"].stack.state_dir
    other = tmp_path / "other-version"
    shutil.copytree(round_trip["backup"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    ours = manifest["databases"]["tracking"]["schema_revision"]
    # As a backup of an older MLflow's database records it: the revision before this MLflow's head.
    manifest["databases"]["tracking"]["schema_revision"] = "75868b020152"
    manifest["mlflow_version"] = "3.16.1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused = backup_cli("restore", str(other), f"--state-dir={state_dir}", "--env-file=")
    assert refused.returncode == 1
    assert (f"holds a tracking database at schema revision 75868b020152 (taken with MLflow 3.16.1) and this native "
            f"stack's is at {ours} (MLflow ") in refused.stderr, refused.stderr

    damaged = tmp_path / "damaged"
    shutil.copytree(round_trip["backup"], damaged)
    victim = next(p for p in (damaged / "objects").rglob("*") if p.is_file())
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    checked = backup_cli("verify", str(damaged))
    assert checked.returncode == 1 and f"objects/{victim.parent.name}/{victim.name}" in checked.stderr
    assert "does not match its checksum" in checked.stderr
    refused = backup_cli("restore", str(damaged), f"--state-dir={state_dir}", "--env-file=")
    assert refused.returncode == 1 and "is damaged, nothing was restored" in refused.stderr
    fine = backup_cli("verify", str(round_trip["backup"]))
    assert fine.returncode == 0 and "match their checksums" in fine.stdout


def test_backups_taken_while_a_trainer_stores_and_evicts_checkpoints_hold_only_whole_ones(round_trip):
    """Backups taken one after another while a trainer uploads a checkpoint every 2 steps and
    retention deletes the one before: in each, every checkpoint manifest kept (read with the
    trainer's own parser) has every file it lists, byte for byte. That is what a restore of it
    brings back (the round trip above restores exactly the backup's objects)."""
    from mltrainer.manifest import Manifest

    stack, work = round_trip["stack"], round_trip["work"]
    proc = start_train(stack, work / "in-flight", "backup-in-flight", "training.max_steps=60",
                       "training.save_steps=2", "training.eval_steps=2", "checkpoints.save_last_k=1",
                       "checkpoints.save_top_k=null", "checkpoints.monitor=null")
    backups_root, taken = work / "in-flight-backups", 0
    while proc.poll() is None or taken < 2:
        made = backup_cli("create", f"--state-dir={stack.stack.state_dir}", "--env-file=", f"--into={backups_root}")
        assert made.returncode == 0, made.stdout + made.stderr
        taken += 1
        # A backup is named by the second it starts in, and refuses a name that exists: on a quick
        # host (a small bucket once the trainer has ended) the next one could start in the same second.
        time.sleep(1.01 - time.time() % 1)
    finish(proc)
    checked = 0
    for backup in sorted(p for p in backups_root.iterdir() if not p.name.startswith(".")):
        manifest = json.loads((backup / "manifest.json").read_text())
        held = {o["key"]: o for o in manifest["bucket"]["objects"]}
        for key, obj in held.items():
            if "/checkpoints/" not in key or not key.endswith("/manifest.json"):
                continue
            ckpt = Manifest.from_json((backup / "objects" / obj["sha256"][:2] / obj["sha256"]).read_bytes())
            root = key[: -len(ckpt.store_path + "/manifest.json")]
            for entry in ckpt.files:
                stored = held.get(root + entry.stored_at)
                assert stored is not None, f"{backup.name}: {key} lists {entry.stored_at}, not in the backup"
                assert (stored["size"], stored["sha256"]) == (entry.size, entry.sha256), (backup.name, key, entry)
            checked += 1
    assert taken >= 2 and checked >= taken, (taken, checked)
