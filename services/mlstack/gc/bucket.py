"""The bucket as gc sees it: listing objects and pending uploads, deleting, aborting.

gc talks to S3 with the MLflow server's bucket-scoped key (the file the storage init job wrote),
so it can do nothing the server could not, and needs no root key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mlstack import settings as s
from mlstack.gc.records import PendingUpload, StoredObject

DELETE_BATCH = 1000  # S3's most keys per DeleteObjects request


class Bucket:
    def __init__(self, client, name: str):
        self.client, self.name = client, name

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Bucket:
        import boto3
        from botocore.config import Config

        path = Path(s.S3_CREDENTIALS_FILE.get(env))
        if not path.is_file():
            raise SystemExit(f"{path} not found ({s.S3_CREDENTIALS_FILE.name}): gc uses the bucket key the "
                             "storage init job writes; is the stack up?")
        key = json.loads(path.read_text())
        client = boto3.client("s3", endpoint_url=s.S3_ENDPOINT_URL.get(env), region_name="us-east-1",
                              aws_access_key_id=key["access_key"], aws_secret_access_key=key["secret_key"],
                              config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return cls(client, s.S3_BUCKET.get(env))

    def objects(self, prefix: str = "") -> list[StoredObject]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            for o in page.get("Contents", []):
                if o["Key"].endswith("/") and o["Size"] == 0:
                    continue  # a folder marker some S3 servers keep, not data
                out.append(StoredObject(o["Key"], o["Size"], o.get("ETag", "").strip('"'),
                                        o["LastModified"].timestamp()))
        return out

    def uploads(self) -> list[PendingUpload]:
        out = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.name):
            for u in page.get("Uploads", []):
                size = sum(p["Size"] for part_page in self.client.get_paginator("list_parts").paginate(
                    Bucket=self.name, Key=u["Key"], UploadId=u["UploadId"]) for p in part_page.get("Parts", []))
                out.append(PendingUpload(u["Key"], u["UploadId"], u["Initiated"].timestamp(), size))
        return out

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i:i + DELETE_BATCH]]
            resp = self.client.delete_objects(Bucket=self.name, Delete={"Objects": batch, "Quiet": True})
            if errors := resp.get("Errors"):
                first = errors[0]
                raise RuntimeError(f"S3 refused to delete {len(errors)} object(s), e.g. {first.get('Key')}: "
                                   f"{first.get('Code')} {first.get('Message')}")

    def abort(self, upload: PendingUpload) -> None:
        self.client.abort_multipart_upload(Bucket=self.name, Key=upload.key, UploadId=upload.upload_id)
