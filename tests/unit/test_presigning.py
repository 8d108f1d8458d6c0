"""How the MLflow server hands out presigned S3 URLs (mlstack.patches.presigned_transfers), checked in-process:
presigning is local to boto3, so no S3 server is needed to see which host a URL names."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from mlflow.exceptions import _UnsupportedMultipartUploadException
from mlflow.server import handlers
from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

from mlstack.patches.presigned_transfers import check_presigned_transfers, install_presigned_transfers


@pytest.fixture
def restore(monkeypatch):
    """Undo whatever install_presigned_transfers patches, after the test."""
    for name in ("MultipartUploadMixin", "MultipartDownloadMixin", "PresignedUploadMixin"):
        monkeypatch.setattr(handlers, name, getattr(handlers, name))
    monkeypatch.setattr(S3ArtifactRepository, "_get_s3_client", S3ArtifactRepository._get_s3_client)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://s3:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "scoped")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")


def test_public_endpoint_signs_urls_for_it_while_calls_stay_internal(restore):
    assert install_presigned_transfers("http://files.example.org:9000") is True
    client = S3ArtifactRepository("s3://mlflow/artifacts")._get_s3_client()

    url = client.generate_presigned_url("upload_part", Params={"Bucket": "mlflow", "Key": "a/b", "PartNumber": 1,
                                                               "UploadId": "u"})
    assert urlsplit(url).netloc == "files.example.org:9000"
    assert "X-Amz-Signature=" in url
    assert client.meta.endpoint_url == "http://s3:9000"  # where the server itself talks to S3
    handlers._validate_support_multipart_upload(S3ArtifactRepository("s3://mlflow/artifacts"))  # offered


@pytest.mark.parametrize("value", ["", "off", "None"])
def test_no_public_endpoint_means_no_presigned_transfers(restore, value):
    assert install_presigned_transfers(value) is False
    repo = S3ArtifactRepository("s3://mlflow/artifacts")
    # What /server-info and the mpu/presigned handlers ask: clients then use the proxied endpoints.
    assert not isinstance(repo, handlers.MultipartUploadMixin)
    assert not isinstance(repo, handlers.MultipartDownloadMixin)
    with pytest.raises(_UnsupportedMultipartUploadException):
        handlers._validate_support_multipart_upload(repo)
    assert urlsplit(repo._get_s3_client().generate_presigned_url(
        "get_object", Params={"Bucket": "mlflow", "Key": "k"})).netloc == "s3:9000"


@pytest.mark.parametrize("value", ["http://files.example.org:9000", "", "off"])
def test_the_self_check_sees_whether_the_patch_took_hold(restore, value):
    """What the server checks at start (mlstack.patches.self_check): the effect, on or off."""
    assert check_presigned_transfers(value) is not None  # MLflow as it comes: not what was asked for
    install_presigned_transfers(value)
    assert check_presigned_transfers(value) is None
