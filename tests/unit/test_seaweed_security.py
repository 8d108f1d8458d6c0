"""The SeaweedFS lockdown material: what security.toml demands, and how its files are kept.

Whether SeaweedFS then refuses everyone else is tested against the running server in
tests/integration/test_s3_lockdown.py; this checks the material itself.
"""

from __future__ import annotations

import ipaddress
import stat
import tomllib

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mlstack import seaweed_security as sec


def load(directory):
    return tomllib.loads((directory / sec.CONFIG_NAME).read_text())


def test_every_internal_port_demands_the_certificate_and_tokens(tmp_path):
    sec.write(tmp_path)
    config = load(tmp_path)
    ca, cert, key = (str(tmp_path / name) for name in (sec.CA_CERT, sec.CERT, sec.KEY))
    assert config["grpc"]["ca"] == ca
    for component in ("master", "volume", "filer", "s3", "client"):
        assert config["grpc"][component] == {"cert": cert, "key": key}
    for component in ("master", "volume", "filer"):  # `ca` set: the server demands a client certificate
        assert config["https"][component] == {"cert": cert, "key": key, "ca": ca}
    assert config["https"]["client"] == {"enabled": True, "cert": cert, "key": key, "ca": ca}
    keys = [config["jwt"]["signing"]["key"], config["jwt"]["signing"]["read"]["key"],
            config["jwt"]["filer_signing"]["key"], config["jwt"]["filer_signing"]["read"]["key"]]
    assert len(set(keys)) == 4 and all(len(k) == 64 for k in keys)


def test_the_certificate_is_signed_by_the_ca_for_both_ends_on_loopback(tmp_path):
    sec.write(tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / sec.CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / sec.CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)


def test_files_are_private_and_the_ca_key_is_not_kept(tmp_path):
    directory = tmp_path / "security"
    sec.write(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted([sec.CONFIG_NAME, sec.CA_CERT, sec.CERT, sec.KEY])
    assert all(stat.S_IMODE((directory / name).stat().st_mode) == 0o600 for name in files)
    # One private key only, the certificate's: with no CA key, nobody can sign another certificate.
    assert [name for name in files if b"PRIVATE KEY" in (directory / name).read_bytes()] == [sec.KEY]


def test_each_write_makes_new_material(tmp_path):
    sec.write(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (sec.CONFIG_NAME, sec.CA_CERT, sec.CERT, sec.KEY)}
    sec.write(tmp_path)
    assert all((tmp_path / name).read_bytes() != data for name, data in before.items())


def test_ensure_keeps_what_a_running_server_uses(tmp_path):
    config, written = sec.ensure(tmp_path)
    assert written and config == tmp_path / sec.CONFIG_NAME
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    sec.main([str(tmp_path)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
