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

DISABLED_VALUES = ("", "off", "none", "false")


def install_presigned_transfers(public_endpoint: str) -> bool:
    """Presign S3 URLs on ``public_endpoint``, or switch presigned transfers off; True when on."""
    from mlflow.server import handlers
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    if public_endpoint.strip().lower() in DISABLED_VALUES:
        # The server-info answer and the mpu/presigned handlers all ask isinstance(repo, <mixin>);
        # a mixin nobody implements makes them answer "unsupported", which clients handle by
        # falling back to the proxied endpoints.
        class _NoPresignedTransfers(abc.ABC):
            pass

        for name in ("MultipartUploadMixin", "MultipartDownloadMixin", "PresignedUploadMixin"):
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
