"""Checkpoint file transfers against the real stack: straight to S3 on presigned URLs, through the
server, and the fallback from one to the other when S3 cannot be reached."""

from __future__ import annotations

import hashlib
import logging
import os
from urllib.parse import urlsplit, urlunsplit

import pytest
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from mlstack.native.processes import free_port
from mltrainer.transfer import MiB, RunArtifacts

from trainer_support import artifact_prefix, read_object

PART = 5 * MiB  # S3's smallest part, so a small file still has several


class CountingRepo:
    """The run's real MLflow artifact repository, counting the presigned-transfer requests made."""

    def __init__(self, repo, rewrite_netloc: str | None = None):
        self._repo, self._rewrite = repo, rewrite_netloc
        self.multipart_creates = 0
        self.presigned_downloads = 0

    def __getattr__(self, name):
        return getattr(self._repo, name)

    def _moved(self, url: str) -> str:
        if self._rewrite is None:
            return url
        return urlunsplit(urlsplit(url)._replace(netloc=self._rewrite))

    def create_multipart_upload(self, *args, **kwargs):
        self.multipart_creates += 1
        created = self._repo.create_multipart_upload(*args, **kwargs)
        for credential in created.credentials:
            credential.url = self._moved(credential.url)
        return created

    def _get_presigned_download_url(self, *args, **kwargs):
        self.presigned_downloads += 1
        presigned = self._repo._get_presigned_download_url(*args, **kwargs)
        presigned.url = self._moved(presigned.url)
        return presigned


@pytest.fixture
def run(mlflow_client_env):
    client = MlflowClient()
    exp = client.get_experiment_by_name("transfers") or client.get_experiment(client.create_experiment("transfers"))
    created = client.create_run(exp.experiment_id)
    yield client, created
    client.set_terminated(created.info.run_id)


def store_for(run, **kwargs) -> tuple[RunArtifacts, CountingRepo]:
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    real = get_artifact_repository(run.info.artifact_uri)
    repo = CountingRepo(real, kwargs.pop("rewrite_netloc", None))
    store = RunArtifacts(repo, part_size=PART, direct_min_size=1 * MiB, **kwargs)
    # RunArtifacts asks isinstance(repo, HttpArtifactRepository): the counter stands in for one.
    store._is_http = lambda: isinstance(real, HttpArtifactRepository)
    return store, repo


def write_random(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_large_file_goes_straight_to_s3_and_back(run, mlflow_client_env, tmp_path):
    client, created = run
    store, repo = store_for(created)
    data = write_random(tmp_path / "optimizer.pt", 12 * MiB + 123)  # three parts, the last one short

    store.log_artifact(str(tmp_path / "optimizer.pt"), "checkpoints/step-1")
    prefix = artifact_prefix(client, created.info.run_id)
    assert repo.multipart_creates == 1
    assert read_object(mlflow_client_env, prefix + "checkpoints/step-1/optimizer.pt") == data

    digest = store.download_file("checkpoints/step-1/optimizer.pt", tmp_path / "back.pt", size=len(data))
    assert repo.presigned_downloads == 1
    assert (tmp_path / "back.pt").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_small_file_goes_through_the_server(run, mlflow_client_env, tmp_path):
    client, created = run
    store, repo = store_for(created)
    data = write_random(tmp_path / "config.json", 4_000)

    store.log_artifact(str(tmp_path / "config.json"), "checkpoints/step-1")
    digest = store.download_file("checkpoints/step-1/config.json", tmp_path / "back.json", size=len(data))
    assert (repo.multipart_creates, repo.presigned_downloads) == (0, 0)
    assert read_object(mlflow_client_env, artifact_prefix(client, created.info.run_id)
                       + "checkpoints/step-1/config.json") == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.read_bytes("checkpoints/step-1/config.json") == data


def test_mlflow_switches_keep_every_byte_on_the_server(run, mlflow_client_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    client, created = run
    store, repo = store_for(created)
    data = write_random(tmp_path / "model.safetensors", 6 * MiB)

    store.log_artifact(str(tmp_path / "model.safetensors"), "c")
    digest = store.download_file("c/model.safetensors", tmp_path / "back", size=len(data))
    assert (repo.multipart_creates, repo.presigned_downloads) == (0, 0)
    assert (tmp_path / "back").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_unreachable_s3_endpoint_falls_back_to_the_server(run, mlflow_client_env, tmp_path, caplog):
    client, created = run
    nobody_listens = f"127.0.0.1:{free_port()}"  # what a trainer sees when the presigned host is not reachable
    store, repo = store_for(created, rewrite_netloc=nobody_listens)
    first = write_random(tmp_path / "a.bin", 7 * MiB)
    second = write_random(tmp_path / "b.bin", 7 * MiB)

    with caplog.at_level(logging.WARNING, logger="mltrainer.transfer"):
        store.log_artifact(str(tmp_path / "a.bin"), "c")
        store.log_artifact(str(tmp_path / "b.bin"), "c")
        digest = store.download_file("c/a.bin", tmp_path / "back", size=len(first))

    prefix = artifact_prefix(client, created.info.run_id)
    assert read_object(mlflow_client_env, prefix + "c/a.bin") == first
    assert read_object(mlflow_client_env, prefix + "c/b.bin") == second
    assert digest == hashlib.sha256(first).hexdigest()
    # One failed attempt, then the server for everything else, with one warning that says what to set.
    assert (repo.multipart_creates, repo.presigned_downloads) == (1, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "S3_PUBLIC_ENDPOINT_URL" in warnings[0], warnings
    # The abandoned multipart upload was aborted, not left to hold storage.
    s3 = mlflow_client_env.s3_root()
    pending = s3.list_multipart_uploads(Bucket=mlflow_client_env.bucket, Prefix=prefix).get("Uploads", [])
    assert pending == []
