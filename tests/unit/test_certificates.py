"""The load balancer's certificate: kept once made, remade only for a new name, the operator's
checked against its key, and the HAProxy configuration built around it."""

from __future__ import annotations

import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mlstack.balancer import Backends, haproxy_config
from mlstack.certificates import BUNDLE, CertificateError, ensure_tls_material


def test_self_signed_is_made_once_and_reused(tmp_path):
    first = ensure_tls_material(tmp_path)
    again = ensure_tls_material(tmp_path)
    assert first.made_now and not again.made_now
    assert first.fingerprint == again.fingerprint and len(first.fingerprint.split(":")) == 32
    assert first.self_signed and first.certificate == tmp_path / "cert.pem"
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / BUNDLE).stat().st_mode) == 0o600
    # A trust store takes it as it is (the TLS handshake with it: tests/integration/test_scale_out.py).
    ctx = ssl.create_default_context(cafile=str(first.certificate))
    assert ctx.get_ca_certs()[0]["subjectAltName"][:2] == (("DNS", "localhost"), ("IP Address", "127.0.0.1"))


def test_a_new_public_name_makes_a_new_certificate(tmp_path):
    first = ensure_tls_material(tmp_path)
    moved = ensure_tls_material(tmp_path, public_host="tracking.example.org")
    assert moved.made_now and moved.fingerprint != first.fingerprint
    cert = x509.load_pem_x509_certificate(moved.certificate.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "tracking.example.org" in names


def test_a_new_machine_hostname_keeps_the_certificate(tmp_path, monkeypatch):
    """compose's lb-init gets a new hostname (its container id) with every container: the kept
    certificate, and the fingerprint teammates trust, must survive that."""
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "0123456789ab")
    first = ensure_tls_material(tmp_path)
    monkeypatch.setattr(socket, "gethostname", lambda: "ba9876543210")
    again = ensure_tls_material(tmp_path)
    assert not again.made_now and again.fingerprint == first.fingerprint


def test_operators_certificate_is_checked_against_its_key(tmp_path):
    a, b = ensure_tls_material(tmp_path / "a"), ensure_tls_material(tmp_path / "b", public_host="other.example")
    given = ensure_tls_material(tmp_path / "lb", str(a.certificate), str(tmp_path / "a" / "key.pem"))
    assert given.fingerprint == a.fingerprint and given.certificate == a.certificate and not given.made_now
    bundle = (tmp_path / "lb" / BUNDLE).read_bytes()
    assert x509.load_pem_x509_certificate(bundle).fingerprint is not None
    serialization.load_pem_private_key(bundle[bundle.index(b"-----BEGIN PRIVATE KEY"):], password=None)
    with pytest.raises(CertificateError, match=r"TLS_KEY_FILE=.*b/key.pem is not the key of the certificate in TLS_CERT_FILE"):
        ensure_tls_material(tmp_path / "lb", str(a.certificate), str(tmp_path / "b" / "key.pem"))
    with pytest.raises(CertificateError, match=r"TLS_CERT_FILE=.*missing.pem: no such file"):
        ensure_tls_material(tmp_path / "lb", str(tmp_path / "missing.pem"), str(tmp_path / "a" / "key.pem"))
    with pytest.raises(CertificateError, match="set both TLS_CERT_FILE and TLS_KEY_FILE"):
        ensure_tls_material(tmp_path / "lb", str(a.certificate), "")
    assert b.fingerprint != a.fingerprint


def test_haproxy_config_checks_health_retries_elsewhere_and_sets_forwarded_for(tmp_path):
    config = haproxy_config(bind="127.0.0.1", port=5000, bundle=tmp_path / BUNDLE, health_host="127.0.0.1",
                            backends=Backends(addresses=(("127.0.0.1", 4001), ("127.0.0.1", 4002))))
    lines = [line.strip() for line in config.splitlines()]
    assert f"bind 127.0.0.1:5000 ssl crt {tmp_path / BUNDLE} alpn http/1.1" in lines
    assert "server mlflow-1 127.0.0.1:4001 check inter 1s fall 2 rise 2" in lines
    assert "server mlflow-2 127.0.0.1:4002 check inter 1s fall 2 rise 2" in lines
    assert "http-check send meth GET uri /health ver HTTP/1.1 hdr Host 127.0.0.1" in lines
    assert "option redispatch 1" in lines and any(line.startswith("retry-on conn-failure empty-response") for line in lines)
    # A POST that may have been carried out (create_run, a model...) is not sent again; metric batches
    # are. What HAProxy does with these rules: tests/integration/test_balancer_cut_answers.py.
    assert "acl metrics_write path_end /runs/log-batch /runs/log-metric" in lines
    assert "acl upload_start_or_abort path_beg /api/2.0/mlflow-artifacts/mpu/create/ " \
           "/api/2.0/mlflow-artifacts/mpu/abort/" in lines
    assert "http-request set-var(txn.replay_safe) bool(1) if !METH_POST or metrics_write or upload_start_or_abort" \
           in lines
    assert "http-request disable-l7-retry if !{ var(txn.replay_safe) -m bool }" in lines
    # The client's own X-Forwarded-For is dropped before HAProxy adds the real one.
    assert lines.index("http-request del-header X-Forwarded-For") < lines.index("option forwardfor")
    dns = haproxy_config(bind="0.0.0.0", port=8443, bundle=tmp_path / BUNDLE, health_host="mlflow",
                         backends=Backends(dns_name="mlflow", dns_port=5000, slots=3))
    assert "server-template mlflow 1-3 mlflow:5000 check inter 1s fall 2 rise 2 resolvers dns init-addr none" in dns
    assert "parse-resolv-conf" in dns
