"""An object gone from a stored checkpoint (real stack): a 404 at once, never a 500 to retry.

The objects are deleted straight from the bucket with the S3 root key, as a lifecycle rule or a
hand-made cleanup would. How many times a path was asked for is read from the MLflow server's
own access log: MLflow's client retries a 500 seven times with growing pauses (about four
minutes), which is how a resume stalled on a checkpoint with one object missing.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
import requests
from mlflow.tracking import MlflowClient

from mltrainer.manifest import MANIFEST_NAME, build_manifest
from mltrainer.resume import download_checkpoint
from mltrainer.store import scan
from mltrainer.transfer import ArtifactMissingError, MiB, RunArtifacts

from trainer_support import artifact_prefix

CHECKPOINT = "checkpoints/step-00000004"


def requests_for(stack, path_fragment: str, route: str = "/mlflow-artifacts/artifacts/") -> list[str]:
    """Access-log lines of the MLflow server for requests on ``route`` whose target ends in ``path_fragment``."""
    log = (stack.stack.logs / "mlflow.log").read_text(errors="replace")
    pattern = re.compile(rf'"(?:GET|HEAD) \S*{re.escape(route)}\S*{re.escape(path_fragment)} HTTP/1\.1" (\d+)')
    return pattern.findall(log)


@pytest.fixture
def stored_checkpoint(mlflow_client_env, tmp_path):
    """A run holding one complete checkpoint (files + manifest, as the uploader lays it out)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name("missing-objects") or client.get_experiment(
        client.create_experiment("missing-objects"))
    run = client.create_run(exp.experiment_id)
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(3 * MiB))  # over direct_min_size below: presigned
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    (folder / "optimizer.pt").write_bytes(os.urandom(200_000))
    store = RunArtifacts.for_artifact_uri(run.info.artifact_uri, direct_min_size=1 * MiB)
    manifest = build_manifest(folder, step=4, metrics={}, store_path=CHECKPOINT)
    for entry in manifest.files:
        store.log_artifact(str(folder / entry.path), CHECKPOINT)
    (tmp_path / MANIFEST_NAME).write_text(manifest.to_json())
    store.log_artifact(str(tmp_path / MANIFEST_NAME), CHECKPOINT)
    yield client, run, store
    client.set_terminated(run.info.run_id)


def delete_object(stack, client, run, relpath: str) -> None:
    key = artifact_prefix(client, run.info.run_id) + relpath
    stack.s3_root().delete_object(Bucket=stack.bucket, Key=key)
    assert key not in stack.bucket_keys(key)


def test_server_answers_404_for_a_missing_object_and_400_for_a_folder(stored_checkpoint, mlflow_client_env):
    client, run, _ = stored_checkpoint
    delete_object(mlflow_client_env, client, run, f"{CHECKPOINT}/optimizer.pt")
    root = f"{run.info.experiment_id}/{run.info.run_id}/artifacts"
    auth = mlflow_client_env.trainer_auth

    for api in ("api", "ajax-api"):
        gone = requests.get(f"{mlflow_client_env.uri}/{api}/2.0/mlflow-artifacts/artifacts/{root}/{CHECKPOINT}/optimizer.pt",
                            auth=auth)
        assert gone.status_code == 404, gone.text
        assert gone.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        assert f"{CHECKPOINT}/optimizer.pt" in gone.json()["message"]
        folder = requests.get(f"{mlflow_client_env.uri}/{api}/2.0/mlflow-artifacts/artifacts/{root}/{CHECKPOINT}",
                              auth=auth)
        assert folder.status_code == 400, folder.text
        assert "refers to a directory" in folder.json()["message"]

    # The listing still shows what is left, and what is left still downloads.
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, CHECKPOINT)) == [
        f"{CHECKPOINT}/{MANIFEST_NAME}", f"{CHECKPOINT}/model.safetensors", f"{CHECKPOINT}/trainer_state.json"]
    kept = requests.get(f"{mlflow_client_env.uri}/api/2.0/mlflow-artifacts/artifacts/{root}/{CHECKPOINT}/trainer_state.json",
                        auth=auth)
    assert (kept.status_code, kept.content) == (200, b'{"global_step": 4}')


def test_download_of_a_checkpoint_with_a_missing_object_names_it_and_asks_once(stored_checkpoint, mlflow_client_env,
                                                                                tmp_path, caplog):
    client, run, store = stored_checkpoint
    (checkpoint,) = scan(client, run.info.run_id, store=store)
    assert checkpoint.manifest is not None  # the manifest is there: the checkpoint looks complete
    delete_object(mlflow_client_env, client, run, f"{CHECKPOINT}/optimizer.pt")       # through the server
    delete_object(mlflow_client_env, client, run, f"{CHECKPOINT}/model.safetensors")  # straight from S3

    with caplog.at_level(logging.WARNING, logger="mltrainer.transfer"):
        problem = download_checkpoint(store, checkpoint.manifest, tmp_path / "checkpoint-4", concurrency=1)

    # Largest first: the presigned download finds model.safetensors missing; the checkpoint is refused.
    assert problem is not None
    assert f"{CHECKPOINT}/model.safetensors" in problem and "missing from the run's artifact store (404" in problem
    assert not (tmp_path / "checkpoint-4").exists()
    in_run = f"{run.info.run_id}/artifacts/{CHECKPOINT}"
    assert requests_for(mlflow_client_env, f"{in_run}/model.safetensors", "/mlflow-artifacts/presigned/") == ["404"]
    assert requests_for(mlflow_client_env, f"{in_run}/model.safetensors") == []  # no fallback through the server
    assert requests_for(mlflow_client_env, f"{in_run}/optimizer.pt") == ["404"]  # through the server: asked once
    assert caplog.records == []  # a missing object is no reason to stop using direct S3 transfers
    assert not store._direct_disabled


def test_object_deleted_after_presigning_is_missing_not_a_reason_to_give_up_direct(stored_checkpoint,
                                                                                   mlflow_client_env, tmp_path):
    client, run, store = stored_checkpoint
    presign = store.repo._get_presigned_download_url

    def presign_then_lose_it(remote_path):
        presigned = presign(remote_path)
        delete_object(mlflow_client_env, client, run, remote_path)
        return presigned

    store.repo._get_presigned_download_url = presign_then_lose_it
    with pytest.raises(ArtifactMissingError, match=f"{CHECKPOINT}/model.safetensors"):
        store.download_file(f"{CHECKPOINT}/model.safetensors", tmp_path / "model.safetensors", size=3 * MiB)
    assert not (tmp_path / "model.safetensors").exists()
    assert requests_for(mlflow_client_env, f"{run.info.run_id}/artifacts/{CHECKPOINT}/model.safetensors") == []
    assert not store._direct_disabled
