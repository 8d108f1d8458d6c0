"""Data a team keeps in the stack, written and read back through MLflow's client: the upgrade test
runs this script with the old MLflow's interpreter (``write``, ``snapshot``) and with ours
(``snapshot``), so it uses nothing but MLflow, requests and the standard library.

``write``    as the admin: the second user ``alice``, an experiment she may edit and one she may only
             read; as alice: runs with params, stepped metrics, tags and artifacts, and a registered
             model with a version; as the admin, a run in the admin's experiment.
``snapshot`` everything above as JSON, read through the server: experiments, runs, every metric's
             history, each artifact's sha256 (downloaded through the server), models, permissions,
             both users' logins, and what the server lets alice do (one allowed write that changes
             nothing, refusals to write into the admin's experiment).

Usage: python upgrade_data.py write|snapshot URI ADMIN_USER ADMIN_PASSWORD   (JSON: stdout's last line)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import requests

ALICE, ALICE_PASSWORD = "alice", "alice-upgrade-pw-7Qz"
SHARED, ADMIN_ONLY, MODEL = "team-shared", "admin-only", "upgrade-model"
ARTIFACTS = {  # path in the run -> bytes
    "notes/readme.txt": b"written by the old MLflow\n",
    "weights/blob.bin": bytes(range(256)) * 8192,  # 2 MiB
    "model-files/config.json": b'{"layers": 2}',
}


def client_as(uri: str, user: str, password: str):
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    from mlflow import MlflowClient

    return MlflowClient(uri)


def write(uri: str, admin: str, admin_password: str) -> dict:
    from mlflow.server.auth.client import AuthServiceClient

    client_as(uri, admin, admin_password)
    auth = AuthServiceClient(uri)
    auth.create_user(ALICE, ALICE_PASSWORD)
    admin_client = client_as(uri, admin, admin_password)
    shared = admin_client.create_experiment(SHARED, tags={"team": "nlp"})
    admin_only = admin_client.create_experiment(ADMIN_ONLY)
    auth.grant_user_permission(ALICE, "experiment", shared, "EDIT")
    auth.grant_user_permission(ALICE, "experiment", admin_only, "READ")
    admin_run = admin_client.create_run(admin_only, run_name="admin-run", tags={"owner": "admin"})
    admin_client.log_metric(admin_run.info.run_id, "loss", 0.5, step=1)
    admin_client.set_terminated(admin_run.info.run_id)

    alice = client_as(uri, ALICE, ALICE_PASSWORD)
    run_ids = []
    for n in range(2):
        run = alice.create_run(shared, run_name=f"alice-run-{n}", tags={"dataset": "sst2", "seed": str(n)})
        rid = run.info.run_id
        alice.log_param(rid, "learning_rate", str(10 ** -(n + 3)))
        alice.log_param(rid, "epochs", "3")
        for step in range(5):
            alice.log_metric(rid, "loss", 1.0 / (step + 1 + n), step=step, timestamp=1_700_000_000_000 + step)
            alice.log_metric(rid, "accuracy", 0.5 + step / 10, step=step, timestamp=1_700_000_000_000 + step)
        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in ARTIFACTS.items():
                path = Path(tmp) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                alice.log_artifact(rid, str(path), artifact_path=str(Path(rel).parent))
        alice.set_terminated(rid)
        run_ids.append(rid)
    alice.create_registered_model(MODEL, tags={"stage": "candidate"})
    source = f"{alice.get_run(run_ids[0]).info.artifact_uri}/model-files"
    alice.create_model_version(MODEL, source, run_id=run_ids[0], tags={"quality": "good"})
    return {"experiments": [shared, admin_only], "runs": run_ids + [admin_run.info.run_id]}


def _artifact_digests(client, run_id: str, path: str | None = None) -> dict[str, str]:
    out = {}
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out.update(_artifact_digests(client, run_id, info.path))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, info.path, tmp)
                out[info.path] = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    return out


def _probe(uri: str, auth: tuple[str, str], method: str, path: str, **kwargs) -> int:
    return requests.request(method, f"{uri}/api/2.0/mlflow/{path}", auth=auth, timeout=30, **kwargs).status_code


def snapshot(uri: str, admin: str, admin_password: str) -> dict:
    admin_client = client_as(uri, admin, admin_password)
    experiments = sorted(admin_client.search_experiments(), key=lambda e: e.experiment_id)
    out: dict = {"experiments": [], "runs": {}, "models": [], "permissions": {}, "access": {}}
    for exp in experiments:
        out["experiments"].append({"id": exp.experiment_id, "name": exp.name, "stage": exp.lifecycle_stage,
                                   "tags": dict(exp.tags), "created": exp.creation_time})
        for run in admin_client.search_runs([exp.experiment_id], run_view_type=3):
            rid = run.info.run_id
            out["runs"][rid] = {
                "experiment": exp.experiment_id, "name": run.info.run_name, "status": run.info.status,
                "user": run.info.user_id, "start": run.info.start_time, "end": run.info.end_time,
                "params": run.data.params, "tags": run.data.tags, "latest_metrics": run.data.metrics,
                "metric_history": {
                    key: [(m.step, m.timestamp, m.value) for m in admin_client.get_metric_history(rid, key)]
                    for key in sorted(run.data.metrics)
                },
                "artifacts": _artifact_digests(admin_client, rid),
            }
    for model in admin_client.search_registered_models():
        versions = admin_client.search_model_versions(f"name='{model.name}'")
        out["models"].append({
            "name": model.name, "tags": dict(model.tags),
            "versions": [{"version": v.version, "source": v.source, "run_id": v.run_id, "status": v.status,
                          "tags": dict(v.tags)} for v in sorted(versions, key=lambda v: int(v.version))],
        })

    admin_auth, alice_auth = (admin, admin_password), (ALICE, ALICE_PASSWORD)
    by_name = {e["name"]: e["id"] for e in out["experiments"]}
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(uri)  # as the admin (client_as above)
    for resource_type, name in (("experiment", SHARED), ("experiment", ADMIN_ONLY), ("registered_model", MODEL)):
        resource_id = by_name.get(name, name)
        answer = auth.get_user_permission(ALICE, resource_type, resource_id)
        out["permissions"][name] = [answer.permission, answer.allowed]
    out["alice_is_admin"] = auth.get_user(ALICE).is_admin

    alice_run = next(rid for rid, r in out["runs"].items() if r["name"] == "alice-run-0")
    admin_run = next(rid for rid, r in out["runs"].items() if r["name"] == "admin-run")
    out["access"] = {
        "admin login": _probe(uri, admin_auth, "GET", "experiments/search", params={"max_results": 1}),
        "alice login": _probe(uri, alice_auth, "GET", "experiments/search", params={"max_results": 1}),
        "alice wrong password": _probe(uri, (ALICE, "wrong"), "GET", "experiments/search", params={"max_results": 1}),
        # An allowed write that changes nothing: the tag already has this value.
        "alice sets a tag on her run": _probe(uri, alice_auth, "POST", "runs/set-tag",
                                              json={"run_id": alice_run, "key": "dataset", "value": "sst2"}),
        "alice reads the admin's run": _probe(uri, alice_auth, "GET", "runs/get", params={"run_id": admin_run}),
        "alice logs into the admin's run": _probe(uri, alice_auth, "POST", "runs/log-metric",
                                                  json={"run_id": admin_run, "key": "x", "value": 1, "timestamp": 1, "step": 0}),
        "alice tags the admin's experiment": _probe(uri, alice_auth, "POST", "experiments/set-experiment-tag",
                                                    json={"experiment_id": by_name[ADMIN_ONLY], "key": "x", "value": "y"}),
    }
    return out


def main() -> int:
    command, uri, admin, password = sys.argv[1:5]
    result = write(uri, admin, password) if command == "write" else snapshot(uri, admin, password)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
