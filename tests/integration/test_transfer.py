"""Checkpoint file transfers against the real stack: straight to S3 on presigned URLs, through the
server, and the fallback from one to the other when S3 cannot be reached."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest
from mlflow.tracking import MlflowClient

from mlstack.native.processes import free_port
from mltrainer.transfer import MiB, RunArtifacts

from trainer_support import artifact_prefix, read_object

PART = 5 * MiB  # S3's smallest part, so a small file still has several


@dataclass
class Counts:
    multipart_creates: int = 0
    presigned_downloads: int = 0


def instrument(repo, rewrite_netloc: str | None = None) -> Counts:
    """Count the run's real repository's presigned-transfer requests; optionally point the URLs
    the server hands out at another host (what a trainer sees when S3 is not reachable)."""
    counts = Counts()
    create, presign = repo.create_multipart_upload, repo._get_presigned_download_url

    def moved(url: str) -> str:
        return url if rewrite_netloc is None else urlunsplit(urlsplit(url)._replace(netloc=rewrite_netloc))

    def create_multipart_upload(*args, **kwargs):
        counts.multipart_creates += 1
        created = create(*args, **kwargs)
        for credential in created.credentials:
            credential.url = moved(credential.url)
        return created

    def get_presigned_download_url(*args, **kwargs):
        counts.presigned_downloads += 1
        presigned = presign(*args, **kwargs)
        presigned.url = moved(presigned.url)
        return presigned

    repo.create_multipart_upload = create_multipart_upload
    repo._get_presigned_download_url = get_presigned_download_url
    return counts


@pytest.fixture
def run(mlflow_client_env):
    client = MlflowClient()
    exp = client.get_experiment_by_name("transfers") or client.get_experiment(client.create_experiment("transfers"))
    created = client.create_run(exp.experiment_id)
    yield client, created
    client.set_terminated(created.info.run_id)


def store_for(run, rewrite_netloc: str | None = None) -> tuple[RunArtifacts, Counts]:
    store = RunArtifacts.for_artifact_uri(run.info.artifact_uri, part_size=PART, direct_min_size=1 * MiB)
    return store, instrument(store.repo, rewrite_netloc)


def write_random(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_large_file_goes_straight_to_s3_and_back(run, mlflow_client_env, tmp_path, caplog):
    client, created = run
    store, counts = store_for(created)
    data = write_random(tmp_path / "optimizer.pt", 12 * MiB + 123)  # three parts, the last one short

    with caplog.at_level(logging.WARNING, logger="mltrainer.transfer"):
        store.log_artifact(str(tmp_path / "optimizer.pt"), "checkpoints/step-1")
    assert not caplog.records, "the direct upload failed and fell back to the server"
    prefix = artifact_prefix(client, created.info.run_id)
    assert counts.multipart_creates == 1
    assert read_object(mlflow_client_env, prefix + "checkpoints/step-1/optimizer.pt") == data

    digest = store.download_file("checkpoints/step-1/optimizer.pt", tmp_path / "back.pt", size=len(data))
    assert counts.presigned_downloads == 1
    assert (tmp_path / "back.pt").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()

    # The CRC-32 the resume path checks is joined from the three ranges' own.
    crc = store.download_file("checkpoints/step-1/optimizer.pt", tmp_path / "again.pt", size=len(data),
                              checksum="crc32")
    assert counts.presigned_downloads == 2
    assert (tmp_path / "again.pt").read_bytes() == data
    assert crc == f"{zlib.crc32(data):08x}"


def test_part_limit_governs_the_parts_in_flight_to_s3(run, mlflow_client_env, tmp_path):
    """The uploader paces uploads through this limit; the real upload must honour it, and raising
    it must let parts go side by side again."""
    client, created = run
    store, _ = store_for(created)
    in_flight, most = 0, []
    lock = threading.Lock()

    def counting_put(put):
        def wrapped(*args, **kwargs):
            nonlocal in_flight
            with lock:
                in_flight += 1
                most[-1] = max(most[-1], in_flight)
            try:
                time.sleep(0.1)  # long enough for the other parts to start, were they allowed
                return put(*args, **kwargs)
            finally:
                with lock:
                    in_flight -= 1
        return wrapped

    make_session = store._session  # one session per part thread; count each one's PUTs

    def session_with_counting_put():
        s = make_session()
        if not getattr(s.put, "_counting", False):
            s.put = counting_put(s.put)
            s.put._counting = True
        return s

    store._session = session_with_counting_put
    data = write_random(tmp_path / "optimizer.pt", 4 * PART)  # four parts
    prefix = artifact_prefix(client, created.info.run_id)
    for limit, name in ((1, "paced.pt"), (8, "hurried.pt")):
        store.part_limit.set(limit)
        most.append(0)
        (tmp_path / name).write_bytes(data)
        store.log_artifact(str(tmp_path / name), "checkpoints/step-1")
        assert read_object(mlflow_client_env, prefix + f"checkpoints/step-1/{name}") == data
    assert most == [1, 4]


def test_small_file_goes_through_the_server(run, mlflow_client_env, tmp_path):
    client, created = run
    store, counts = store_for(created)
    data = write_random(tmp_path / "config.json", 4_000)

    store.log_artifact(str(tmp_path / "config.json"), "checkpoints/step-1")
    digest = store.download_file("checkpoints/step-1/config.json", tmp_path / "back.json", size=len(data))
    assert (counts.multipart_creates, counts.presigned_downloads) == (0, 0)
    assert read_object(mlflow_client_env, artifact_prefix(client, created.info.run_id)
                       + "checkpoints/step-1/config.json") == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.read_bytes("checkpoints/step-1/config.json") == data


def test_mlflow_switches_keep_every_byte_on_the_server(run, mlflow_client_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    client, created = run
    store, counts = store_for(created)
    data = write_random(tmp_path / "model.safetensors", 6 * MiB)

    store.log_artifact(str(tmp_path / "model.safetensors"), "c")
    digest = store.download_file("c/model.safetensors", tmp_path / "back", size=len(data))
    crc = store.download_file("c/model.safetensors", tmp_path / "again", size=len(data), checksum="crc32")
    assert (counts.multipart_creates, counts.presigned_downloads) == (0, 0)
    assert (tmp_path / "back").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert crc == f"{zlib.crc32(data):08x}"


def test_unreachable_s3_endpoint_falls_back_to_the_server(run, mlflow_client_env, tmp_path, caplog):
    client, created = run
    nobody_listens = f"127.0.0.1:{free_port()}"  # what a trainer sees when the presigned host is not reachable
    store, counts = store_for(created, rewrite_netloc=nobody_listens)
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
    assert (counts.multipart_creates, counts.presigned_downloads) == (1, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "S3_PUBLIC_ENDPOINT_URL" in warnings[0], warnings
    # The abandoned multipart upload was aborted, not left to hold storage.
    s3 = mlflow_client_env.s3_root()
    pending = s3.list_multipart_uploads(Bucket=mlflow_client_env.bucket, Prefix=prefix).get("Uploads", [])
    assert pending == []
