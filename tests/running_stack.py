"""A native stack started for tests: its URI, accounts and bucket, as the tests reach them.

Its own module, not conftest: `from conftest import ...` in a test can resolve to
tests/unit/conftest.py when unit and integration tests are collected together.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3

from mlstack.native.ports import PUBLIC_PORTS
from mlstack.native.processes import free_port
from mlstack.native.stack import Stack


@dataclass
class RunningStack:
    stack: Stack
    env: dict[str, str]

    @property
    def uri(self) -> str:
        return self.env["MLFLOW_PUBLIC_URL"]

    @property
    def trainer_auth(self) -> tuple[str, str]:
        return self.env["MLFLOW_TRAINER_USER"], self.env["MLFLOW_TRAINER_PASSWORD"]

    @property
    def admin_auth(self) -> tuple[str, str]:
        return self.env["MLFLOW_ADMIN_USER"], self.env["MLFLOW_ADMIN_PASSWORD"]

    @property
    def bucket(self) -> str:
        return self.env["S3_BUCKET"]

    def client_env(self, user: str = "trainer") -> dict[str, str]:
        """A client's environment: tracking URI and user credentials, and no S3 variables at all."""
        name, password = self.trainer_auth if user == "trainer" else self.admin_auth
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "S3_"))}
        env.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password)
        if self.env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):  # behind the TLS balancer (STACK_SERVERS >= 2)
            env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = self.env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        return env

    def s3_root(self):
        """boto3 straight to the S3 server with the root key: how tests inspect the bucket."""
        return boto3.client(
            "s3", endpoint_url=self.env["S3_ENDPOINT_URL"], aws_access_key_id=self.env["S3_ROOT_USER"],
            aws_secret_access_key=self.env["S3_ROOT_PASSWORD"], region_name="us-east-1",
        )

    def bucket_keys(self, prefix: str = "") -> dict[str, int]:
        s3, keys = self.s3_root(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return keys


@contextmanager
def environ_set(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` holds ``values`` inside the block; each name is put back as it was after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

# The variables that choose a native stack's public ports (mlstack.native.ports).
STACK_PORT_VARS = tuple(port.variable for port in PUBLIC_PORTS)


def free_stack_ports() -> dict[str, str]:
    """A free port for each public port of a native stack, by the variable that chooses it: a
    second stack beside the session's (or a user's) never meets a taken port."""
    return {name: str(free_port()) for name in STACK_PORT_VARS}
