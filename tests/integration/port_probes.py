"""Probing a running server's sockets as an outsider would: no client certificate, no token, no
S3 signature, and only the standard library (so the probes depend on nothing the server chose).

* ``listeners(pid)``: every TCP port and unix socket the process and its children listen on, read
  from the kernel (psutil for TCP, /proc/net/unix for unix sockets), not from any config;
* ``http(...)``: one HTTP/1.1 request, over plain TCP, over TLS without a client certificate, or
  over a unix socket;
* ``grpc(...)``: one unary gRPC call, spoken as raw HTTP/2 frames (gRPC is HTTP/2: a client
  preface, a HEADERS and a DATA frame), over plain TCP, TLS without a client certificate, or a
  unix socket. No grpcio is needed and none is installed.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

TIMEOUT_S = 5.0
# /proc/net/unix "Flags" of a listening socket (__SO_ACCEPTCON).
UNIX_ACCEPTING = 0x10000


@dataclass(frozen=True)
class Listener:
    kind: str  # "tcp" or "unix"
    address: str  # "host:port" or a socket path
    port: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}"

    def connect(self, tls: bool, alpn: str) -> socket.socket:
        """A connected socket; with ``tls``, a TLS client that presents no certificate and trusts anything."""
        if self.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT_S)
            sock.connect(self.address)
        else:
            host = self.address.rsplit(":", 1)[0]
            sock = socket.create_connection((host, self.port), timeout=TIMEOUT_S)
        if not tls:
            return sock
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols([alpn])
        return context.wrap_socket(sock)


def listeners(pid: int) -> list[Listener]:
    """Every listening TCP port and unix socket of ``pid`` and its descendants."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    found: dict[str, Listener] = {}
    inodes: set[int] = set()
    for proc in procs:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                # A wildcard bind (Go's "::" takes IPv4 too) is reached through loopback, as any
                # local client would reach it.
                host = "127.0.0.1" if conn.laddr.ip in ("0.0.0.0", "::") else conn.laddr.ip
                listener = Listener("tcp", f"{host}:{conn.laddr.port}", conn.laddr.port)
                found[str(listener)] = listener
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            try:
                target = fd.readlink()
            except OSError:
                continue
            if str(target).startswith("socket:["):
                inodes.add(int(str(target)[8:-1]))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & UNIX_ACCEPTING and int(fields[6]) in inodes:
            listener = Listener("unix", fields[7])
            found[str(listener)] = listener
    return sorted(found.values(), key=lambda item: (item.kind, item.port, item.address))


@dataclass
class Reply:
    """What came back: an HTTP status (None when no HTTP answer came), the body, or the error."""
    status: int | None
    body: bytes = b""
    error: str = ""

    def __str__(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return f"HTTP {self.status}: {self.body[:160]!r}"


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (OSError, ssl.SSLError):
        pass  # a reset or TLS alert ends what the server had to say
    return b"".join(chunks)


def http(listener: Listener, method: str, path: str, *, tls: bool = False, body: bytes = b"",
         headers: dict[str, str] | None = None) -> Reply:
    head = {"Host": "localhost", "Connection": "close", "Content-Length": str(len(body)), **(headers or {})}
    request = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    try:
        with listener.connect(tls, "http/1.1") as sock:
            sock.sendall(request.encode() + body)
            raw = _read_all(sock)
    except (OSError, ssl.SSLError) as exc:
        return Reply(None, error=f"{type(exc).__name__}: {exc}")
    if not raw.startswith(b"HTTP/"):
        return Reply(None, raw, error=f"not HTTP: {raw[:40]!r}")
    head, _, payload = raw.partition(b"\r\n\r\n")
    return Reply(int(head.split(None, 2)[1]), payload)


# -- gRPC as raw HTTP/2 ------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, GOAWAY = 0x0, 0x1, 0x4, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as an HPACK 'literal without indexing, new name' with raw (non-Huffman) strings."""
    def string(text: str) -> bytes:
        data = text.encode()
        assert len(data) < 127, "a one-byte HPACK length is all these probes need"
        return bytes([len(data)]) + data

    return b"\x00" + string(name) + string(value)


def protobuf_string(field: int, value: str) -> bytes:
    data = value.encode()
    return bytes([field << 3 | 2, len(data)]) + data


def protobuf_varint(field: int, value: int) -> bytes:
    assert value < 128
    return bytes([field << 3, value])


@dataclass
class GrpcReply:
    """answered: a HEADERS frame came back on the call's stream, i.e. a gRPC server took the call."""
    answered: bool
    data: bytes = b""
    error: str = ""

    def __str__(self) -> str:
        return f"answered, data {self.data[:160]!r}" if self.answered else f"no answer ({self.error})"


def grpc(listener: Listener, method: str, message: bytes, *, tls: bool = False) -> GrpcReply:
    """Call ``method`` ("/package.Service/Method") with one protobuf ``message``."""
    headers = b"".join(_hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "https" if tls else "http"), (":path", method),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")))
    grpc_message = b"\x00" + struct.pack(">I", len(message)) + message
    request = (H2_PREFACE + _frame(SETTINGS, 0, 0) + _frame(HEADERS, END_HEADERS, 1, headers)
               + _frame(DATA, END_STREAM, 1, grpc_message))
    answered, data = False, b""
    try:
        with listener.connect(tls, "h2") as sock:
            sock.sendall(request)
            buffer = b""
            while True:
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                    if kind == SETTINGS and not flags & ACK:
                        sock.sendall(_frame(SETTINGS, ACK, 0))
                    elif stream == 1 and kind == HEADERS:
                        answered = True
                        if flags & END_STREAM:
                            return GrpcReply(True, data)
                    elif stream == 1 and kind == DATA:
                        data += payload
                        if flags & END_STREAM:
                            return GrpcReply(True, data)
                    elif kind == GOAWAY:
                        return GrpcReply(answered, data, error="GOAWAY")
                chunk = sock.recv(65536)
                if not chunk:
                    return GrpcReply(answered, data, error="connection closed")
                buffer += chunk
    except (OSError, ssl.SSLError) as exc:
        return GrpcReply(answered, data, error=f"{type(exc).__name__}: {exc}")
