"""Presigned S3 URLs that name an endpoint the clients reach, or no presigned transfers at all.

Large files can skip the server's relay: MLflow's clients ask ``/server-info`` whether the server
hands out presigned S3 URLs (multipart upload, ranged download) and then move the bytes to and
from S3 directly, in parallel, the server only checking who may do it. Those URLs must name an
S3 endpoint the *clients* reach, which in compose is not the ``http://s3:9000`` the server uses:
``S3_PUBLIC_ENDPOINT_URL`` names it, and without it the server says it has no presigned
transfers, so every byte goes through the proxy instead of to a host clients cannot resolve.
"""

from __future__ import annotations

import abc
from urllib.parse import urlsplit

from mlstack.patches.self_check import Patch
from mlstack.settings import S3_PUBLIC_ENDPOINT_URL

DISABLED_VALUES = ("", "off", "none", "false")
# MLflow's capability classes whose isinstance checks decide whether presigned transfers are offered.
PRESIGNING_MIXINS = ("MultipartUploadMixin", "MultipartDownloadMixin", "PresignedUploadMixin")


class _NoPresignedTransfers(abc.ABC):
    """A mixin nobody implements: put in place of MLflow's presigning mixins, every check answers "unsupported"."""


def install_presigned_transfers(public_endpoint: str) -> bool:
    """Presign S3 URLs on ``public_endpoint``, or switch presigned transfers off; True when on."""
    from mlflow.server import handlers
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if _disabled(public_endpoint):
        # The server-info answer and the mpu/presigned handlers all ask isinstance(repo, <mixin>);
        # a mixin nobody implements makes them answer "unsupported", which clients handle by
        # falling back to the proxied endpoints.
        for name in PRESIGNING_MIXINS:
            setattr(handlers, name, _NoPresignedTransfers)
        return False
    original = S3ArtifactRepository._get_s3_client
    if getattr(original, "_presigns_on", None) == public_endpoint:
        return True

    def get_s3_client(self):
        from mlflow.store.artifact.s3_artifact_repo import _get_s3_client

        public = _get_s3_client(access_key_id=self._access_key_id, secret_access_key=self._secret_access_key,
                                session_token=self._session_token, s3_endpoint_url=public_endpoint)
        return PublicPresigning(original(self), public)

    get_s3_client._presigns_on = public_endpoint
    S3ArtifactRepository._get_s3_client = get_s3_client
    return True


def check_presigned_transfers(public_endpoint: str) -> str | None:
    """On: a URL MLflow's S3 repository presigns names the public endpoint (presigning is local,
    no request is made). Off: no module of MLflow's server still holds a real presigning mixin."""
    import sys

    from mlflow.store.artifact import artifact_repo
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if _disabled(public_endpoint):
        from mlflow.server import handlers

        if missing := [n for n in PRESIGNING_MIXINS if getattr(handlers, n, None) is not _NoPresignedTransfers]:
            return f"mlflow.server.handlers.{missing[0]} is not switched off"
        real = {getattr(artifact_repo, n) for n in PRESIGNING_MIXINS}
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("mlflow.server") and module is not None:
                if held := [n for n, v in vars(module).items() if isinstance(v, type) and v in real]:
                    return f"{module_name}.{held[0]} still offers presigned transfers"
        return None
    repo = S3ArtifactRepository("s3://mlstack-self-check/artifacts", access_key_id="self-check",
                                secret_access_key="self-check")
    url = repo.create_presigned_upload_url("probe").presigned_url
    if urlsplit(url).netloc != urlsplit(public_endpoint).netloc:
        return f"a presigned URL names {urlsplit(url).netloc}, not S3_PUBLIC_ENDPOINT_URL's {urlsplit(public_endpoint).netloc}"
    return None


def _disabled(public_endpoint: str) -> bool:
    return public_endpoint.strip().lower() in DISABLED_VALUES


PATCH = Patch(
    name="presigned_transfers",
    without_it="presigned URLs name the S3 endpoint the server uses, which clients may not reach "
               "(or, with S3_PUBLIC_ENDPOINT_URL off, clients are offered presigned transfers all the same)",
    install=lambda: install_presigned_transfers(S3_PUBLIC_ENDPOINT_URL.get()),
    check=lambda app: check_presigned_transfers(S3_PUBLIC_ENDPOINT_URL.get()),
)


class PublicPresigning:
    """An S3 client that makes its calls on the server's endpoint and presigns on the public one.

    Presigning is local (no request is made), and a SigV4 signature covers the Host header, so a
    URL must be signed for the very host the client will send it to: rewriting the host of a URL
    signed for ``s3:9000`` would break it.
    """

    def __init__(self, client, public_client):
        self._client, self._public = client, public_client

    def generate_presigned_url(self, *args, **kwargs):
        return self._public.generate_presigned_url(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)
