"""The certificate the load balancer presents: the operator's, or a self-signed one made once.

A self-signed certificate is kept (in the native stack's state directory, or compose's lb volume)
and reused at every start, so clients that trust it keep trusting it: its SHA-256 fingerprint is
printed for a teammate to compare with what their client is shown. It is made anew only when it
does not name the host of the tracking URI (MLFLOW_PUBLIC_URL changed), and that is said.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SELF_SIGNED_CERT, SELF_SIGNED_KEY = "cert.pem", "key.pem"
# HAProxy reads certificate and key from one file.
BUNDLE = "haproxy.pem"
# Ten years: a self-signed certificate is trusted by copying it, so a short life only adds an outage.
LIFETIME = datetime.timedelta(days=3650)


class CertificateError(RuntimeError):
    """A certificate or key from the settings is missing or unusable; the message names it."""


@dataclass(frozen=True)
class TlsMaterial:
    bundle: Path  # certificate chain + key, for HAProxy (0600)
    certificate: Path  # what clients are given to trust (self-signed) or the operator's chain
    fingerprint: str  # SHA-256 of the server certificate, AA:BB:... as browsers show it
    self_signed: bool  # clients must be told to trust `certificate` (MLFLOW_TRACKING_SERVER_CERT_PATH)
    made_now: bool = False


def fingerprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def required_names(public_url_host: str | None) -> list[str]:
    """The names a kept certificate must cover to be reused: loopback and the public URL's host.

    Not the machine's hostname: in compose that is the lb-init container's id, new with every
    container, and remaking the certificate for it would change the fingerprint teammates trust."""
    names = ["localhost", "127.0.0.1", "::1"]
    if public_url_host and public_url_host not in names:
        names.append(public_url_host)
    return names


def names_for(public_url_host: str | None) -> list[str]:
    """Every name a client on this host or a teammate may use for the server (a new certificate's)."""
    names = required_names(public_url_host)
    if socket.gethostname() not in names:
        names.append(socket.gethostname())
    return names


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _covers(cert: x509.Certificate, names: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = set(san)
    return all(_general_name(n) in have for n in names)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _make_self_signed(directory: Path, names: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mlstack tracking server ({names[-1]})")])
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + LIFETIME)
        # Its own trust anchor: clients put this very file in their trust store.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / SELF_SIGNED_KEY, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # The certificate is public: clients copy it.
    (directory / SELF_SIGNED_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load(cert_path: Path, key_path: Path, cert_var: str, key_var: str) -> tuple[list[x509.Certificate], bytes]:
    for path, var in ((cert_path, cert_var), (key_path, key_var)):
        if not path.is_file():
            raise CertificateError(f"{var}={path}: no such file")
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{cert_var}={cert_path}: not a PEM certificate ({exc})") from None
    key_pem = key_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{key_var}={key_path}: not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateError(f"{key_var}={key_path} is not the key of the certificate in {cert_var}={cert_path}")
    return chain, key_pem


def ensure_tls_material(directory: Path, cert_file: str = "", key_file: str = "",
                        public_host: str | None = None) -> TlsMaterial:
    """The operator's certificate when ``cert_file`` is set, else the kept self-signed one (made
    when missing or when it does not name ``public_host``); writes HAProxy's bundle into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    made_now = False
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise CertificateError("set both TLS_CERT_FILE and TLS_KEY_FILE, or neither (a self-signed certificate)")
        cert_path, key_path = Path(cert_file), Path(key_file)
        chain, key_pem = _load(cert_path, key_path, "TLS_CERT_FILE", "TLS_KEY_FILE")
        self_signed = chain[0].issuer == chain[0].subject
    else:
        cert_path, key_path = directory / SELF_SIGNED_CERT, directory / SELF_SIGNED_KEY
        if not (cert_path.is_file() and key_path.is_file()) or \
                not _covers(x509.load_pem_x509_certificate(cert_path.read_bytes()), required_names(public_host)):
            _make_self_signed(directory, names_for(public_host))
            made_now = True
        chain, key_pem = _load(cert_path, key_path, "the self-signed certificate", "its key")
        self_signed = True
    _write_private(directory / BUNDLE, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + key_pem)
    return TlsMaterial(directory / BUNDLE, cert_path, fingerprint(chain[0]), self_signed, made_now)
