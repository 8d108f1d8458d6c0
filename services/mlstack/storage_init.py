"""One-shot, idempotent storage init: the bucket plus a key scoped to it for the MLflow server.

The root credentials stay with the S3 server and this job. The MLflow server only ever sees the
scoped key, which this job writes to ``S3_CREDENTIALS_FILE`` (a volume shared with the server in
compose, the state directory natively). Re-running keeps a key that still works and replaces
one that does not, so the job is safe to run on every ``make up``.

Two drivers, one job: SeaweedFS speaks the AWS IAM API on its S3 port; MinIO has its own admin
API (through the ``minio`` client library).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from mlstack import settings as s

SCOPED_USER = "mlflow-server"
POLICY_NAME = "mlflow-artifacts"


def log(message: str) -> None:
    print(f"[storage-init] {message}", flush=True)


def bucket_policy(bucket: str) -> dict:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:*"],
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }


def client(service: str, endpoint: str, key: str, secret: str):
    return boto3.client(
        service, endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
        region_name="us-east-1", config=Config(retries={"max_attempts": 3, "mode": "standard"}),
    )


def wait_for_store(endpoint: str, key: str, secret: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client("s3", endpoint, key, secret).list_buckets()
            return
        except (EndpointConnectionError, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.response["Error"]["Code"] in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise SystemExit(f"storage init: the S3 server at {endpoint} rejects S3_ROOT_USER/S3_ROOT_PASSWORD") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"storage init: S3 server at {endpoint} not reachable after {timeout:.0f}s: {exc}") from None
            time.sleep(1)


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        log(f"bucket {bucket} exists")
    except ClientError:
        s3.create_bucket(Bucket=bucket)
        log(f"created bucket {bucket}")


def key_works(endpoint: str, bucket: str, creds: dict) -> bool:
    try:
        client("s3", endpoint, creds["access_key"], creds["secret_key"]).list_objects_v2(Bucket=bucket, MaxKeys=1)
        return True
    except ClientError:
        return False


class SeaweedFSDriver:
    def __init__(self, endpoint: str, root_key: str, root_secret: str):
        self.iam = client("iam", endpoint, root_key, root_secret)

    def create_scoped_key(self, bucket: str) -> dict:
        try:
            self.iam.create_user(UserName=SCOPED_USER)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "EntityAlreadyExists":
                raise
        self.iam.put_user_policy(UserName=SCOPED_USER, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(bucket_policy(bucket)))
        # Old keys of this user belong to earlier runs of this job whose file was lost: retire them.
        for meta in self.iam.list_access_keys(UserName=SCOPED_USER)["AccessKeyMetadata"]:
            self.iam.delete_access_key(UserName=SCOPED_USER, AccessKeyId=meta["AccessKeyId"])
        key = self.iam.create_access_key(UserName=SCOPED_USER)["AccessKey"]
        return {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}


class MinIODriver:
    def __init__(self, endpoint: str, root_key: str, root_secret: str):
        from urllib.parse import urlparse

        from minio import MinioAdmin
        from minio.credentials import StaticProvider

        url = urlparse(endpoint)
        self.admin = MinioAdmin(url.netloc, credentials=StaticProvider(root_key, root_secret), secure=url.scheme == "https")

    def create_scoped_key(self, bucket: str) -> dict:
        from minio.error import MinioAdminException

        access_key = SCOPED_USER
        secret_key = secrets.token_urlsafe(30)
        self.admin.policy_add(POLICY_NAME, policy=bucket_policy(bucket))
        self.admin.user_add(access_key, secret_key)  # resets the secret when the user exists
        try:
            self.admin.attach_policy([POLICY_NAME], user=access_key)
        except MinioAdminException as exc:
            if "already" not in str(exc).lower():  # re-running the job finds it attached
                raise
        return {"access_key": access_key, "secret_key": secret_key}


DRIVERS = {"seaweedfs": SeaweedFSDriver, "minio": MinIODriver}


def write_credentials(path: Path, creds: dict) -> None:
    """Write atomically with owner-only permissions: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh)
    os.replace(tmp, path)


def run(env: dict[str, str]) -> Path:
    backend = s.S3_BACKEND.get(env)
    if backend not in DRIVERS:
        raise SystemExit(f"storage init: S3_BACKEND={backend!r} is not one of {sorted(DRIVERS)}")
    endpoint, bucket = s.S3_ENDPOINT_URL.get(env), s.S3_BUCKET.get(env)
    root_key, root_secret = s.S3_ROOT_USER.get(env), s.S3_ROOT_PASSWORD.get(env)
    wait_for_store(endpoint, root_key, root_secret)
    ensure_bucket(client("s3", endpoint, root_key, root_secret), bucket)

    creds_path = Path(s.S3_CREDENTIALS_FILE.get(env))
    if creds_path.is_file():
        current = json.loads(creds_path.read_text())
        if key_works(endpoint, bucket, current):
            log(f"scoped key for bucket {bucket} already in {creds_path}")
            return creds_path
        log("stored scoped key no longer works; issuing a new one")
    creds = DRIVERS[backend](endpoint, root_key, root_secret).create_scoped_key(bucket)
    # IAM changes reach the S3 gateway asynchronously; wait until the new key is honoured.
    deadline = time.monotonic() + 30
    while not key_works(endpoint, bucket, creds):
        if time.monotonic() > deadline:
            raise SystemExit(f"storage init: the new key for bucket {bucket} is not accepted by {endpoint}")
        time.sleep(0.5)
    write_credentials(creds_path, creds)
    log(f"wrote the bucket-scoped key for {bucket} to {creds_path}")
    return creds_path


def main() -> None:
    try:
        run(dict(os.environ))
    except s.SettingsError as exc:
        raise SystemExit(f"storage init: {exc}") from None


if __name__ == "__main__":
    main()
