"""The credentials that close SeaweedFS's internal ports, so that only its S3 API (signed requests)
answers a client.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process, and
they talk to each other over HTTP and gRPC ports of their own. Left open, those ports serve every
object, listing and write to anyone who can connect (a plain ``curl`` on the filer port reads
any run's files), bypassing MLflow's permissions and the S3 keys. This module writes the
``security.toml`` that SeaweedFS reads from its working directory:

* a private CA and one certificate signed by it: every gRPC port and every master, volume and
  filer HTTP port demands that certificate from its client (mutual TLS). The CA's private key is
  never written, so no further certificate can be signed;
* four JWT keys: the volume server accepts reads and writes, and the filer accepts reads and
  writes (and IAM calls), only with a token signed by these, which only the process itself mints.

The S3 API stays plain HTTP on its own port, guarded by S3 signatures as before. Both ways of
running the stack use this module: the native launcher writes fresh material before each start
of ``weed``; compose runs ``python -m mlstack.seaweed_security DIR`` as a one-shot job into a
volume that the SeaweedFS container mounts and runs in.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONFIG_NAME = "security.toml"  # the name `weed` looks for in its working directory
CA_CERT, CERT, KEY = "ca.crt", "seaweedfs.crt", "seaweedfs.key"

# Each component's gRPC server, and the client side every component dials the others with.
GRPC_SECTIONS = ("master", "volume", "filer", "s3", "client")
# The HTTP ports besides S3's. The S3 gateway reaches the volume servers over these, as a client.
HTTPS_SERVERS = ("master", "volume", "filer")
# [jwt.signing]: volume server writes; [jwt.filer_signing]: filer writes and IAM calls; each
# `.read` twin: reads. Tokens are minted per request and live 10 s (SeaweedFS's default).
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
JWT_LIFETIME_S = 10

# The certificate names the address SeaweedFS's parts reach each other on (they bind loopback
# natively and inside the compose container); hostnames are not otherwise checked.
LOOPBACK = "127.0.0.1"
# Material lives as long as one start of the server (native) or one volume (compose): an expiry
# date would only add a way for a long-running store to break. RFC 5280 4.1.2.5: "no end".
NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificates() -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and one certificate for both ends of every connection: (ca, cert, key) PEM."""
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)  # clock skew
    ca_key, node_key = _new_key(), _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlstack SeaweedFS CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlstack-seaweedfs")]))
        .issuer_name(ca_name).public_key(node_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    return ca.public_bytes(serialization.Encoding.PEM), node.public_bytes(serialization.Encoding.PEM), key_pem


def render(directory: Path, jwt_keys: dict[str, str]) -> str:
    """security.toml pointing at the certificate files in ``directory`` (absolute paths)."""
    def q(value: str | Path) -> str:
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string

    ca, cert, key = (directory / name for name in (CA_CERT, CERT, KEY))
    lines = ["# Written by mlstack.seaweed_security: SeaweedFS's internal ports take only these credentials.", ""]
    for section in JWT_SECTIONS:
        lines += [f"[{section}]", f"key = {q(jwt_keys[section])}", f"expires_after_seconds = {JWT_LIFETIME_S}", ""]
    lines += ["[grpc]", f"ca = {q(ca)}", ""]
    for component in GRPC_SECTIONS:
        lines += [f"[grpc.{component}]", f"cert = {q(cert)}", f"key = {q(key)}", ""]
    # A server with `ca` set verifies, and so demands, a client certificate.
    for component in HTTPS_SERVERS:
        lines += [f"[https.{component}]", f"cert = {q(cert)}", f"key = {q(key)}", f"ca = {q(ca)}", ""]
    lines += ["[https.client]", "enabled = true", f"cert = {q(cert)}", f"key = {q(key)}", f"ca = {q(ca)}", ""]
    return "\n".join(lines)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write(directory: Path) -> Path:
    """Fresh certificates and keys in ``directory`` (made private to this user); returns the config path.

    Only the user running SeaweedFS may read the directory: its files are the keys to the store.
    The config file is written last, so its presence means the material beside it is complete.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_pem, cert_pem, key_pem = _certificates()
    for name, data in ((CA_CERT, ca_pem), (CERT, cert_pem), (KEY, key_pem)):
        _write_private(directory / name, data)
    jwt_keys = {section: secrets.token_hex(32) for section in JWT_SECTIONS}
    config = directory / CONFIG_NAME
    _write_private(config, render(directory, jwt_keys).encode())
    return config


def ensure(directory: Path) -> tuple[Path, bool]:
    """The config in ``directory``, written only if missing: (path, whether it was written now).

    For compose, where this job runs on every `up` while a SeaweedFS container may already be
    running with the current material: replacing it then would cut that server off from itself.
    """
    config = Path(directory).resolve() / CONFIG_NAME
    if config.is_file():
        return config, False
    return write(Path(directory)), True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlstack.seaweed_security", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where security.toml and its certificates go")
    args = parser.parse_args(argv)
    config, written = ensure(args.directory)
    print(f"seaweed-security: {'wrote' if written else 'kept the existing'} {config}", file=sys.stderr)


if __name__ == "__main__":
    main()
