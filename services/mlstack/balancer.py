"""HAProxy in front of several MLflow server instances: TLS, health checks, retries.

The native launcher writes this configuration for the instances it started on loopback ports;
compose runs this module as the ``lb-init`` job (``python -m mlstack.balancer DIR``), which writes
the same configuration, with the instances found by DNS (the scaled ``mlflow`` service), and the
certificate into the volume HAProxy reads.

Why each choice:
- Health checks on ``/health`` every second; an instance that fails two is out until it passes two.
- A request whose connection to an instance fails, or that gets no response at all (the instance
  was killed while it held the request), is sent again to another instance (``retry-on`` with
  ``option redispatch``), so a dying instance fails no request HAProxy can still replay (bodies
  up to the buffer size: metrics, small files). A longer upload cut off gets a 502 and the MLflow
  client's own retries send it again. Only replays that are safe: a connection that failed never
  delivered the request; after no response, a PUT (an artifact to the same path writes the same
  object), a metrics POST (MLflow stores a point with the same key, step, timestamp and value
  once) and the start or abort of a multipart upload (a start sent twice leaves an unused upload,
  which `make gc` removes) go again; any other POST does not (a create_run or a new model may
  already be stored), and its client gets a 502. MLflow's own client resends a 502 whatever the
  method, so that last choice spares only other clients a duplicate.
- An instance killed after it wrote an answer's headers but before its body leaves HAProxy with a
  response it has begun: no ``retry-on`` covers it, and passed on it reaches the client as headers
  without a body (a broken read that MLflow's client does not retry). For the requests safe to
  replay, HAProxy holds a small answer until its body is in and turns one cut short into a 502,
  which MLflow's client sends again (to the instance left). Any other POST keeps the broken read:
  the client sees an error and no duplicate is made.
- Timeouts as long as the instances' own (gunicorn's 600 s): a large checkpoint file streams
  through without HAProxy cutting it.
- X-Forwarded-For is set by HAProxy alone (a client's own is dropped), so the servers, which trust
  only the balancer's address, count failed logins per real client.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mlstack import settings as s
from mlstack.certificates import CertificateError, ensure_tls_material

CONFIG_NAME = "haproxy.cfg"
# The instances' own request timeout (mlstack.mlflow_server: gunicorn --timeout 600).
TRANSFER_TIMEOUT = "600s"
# HAProxy keeps a request whose body fits its buffer, to replay it elsewhere; 64 KiB holds a
# metrics batch (MLflow's 1000 points) and small artifact files.
BUFFER_BYTES = 65536
HEALTH_PATH = "/health"
MULTIPART = "/api/2.0/mlflow-artifacts/mpu"  # MLflow's multipart upload endpoints: create, complete, abort
# Answers that declare up to this size are held whole before their headers go on, to tell one cut
# off by a dying instance; larger ones and streams go on as they come. CUT_WAIT bounds the hold for
# an instance that is alive but slow to send a small body.
CUT_CHECK_BYTES = 16384
CUT_WAIT = "30s"
CUT_ANSWER = ('{"error_code": "TEMPORARILY_UNAVAILABLE", '
              '"message": "the server instance stopped while answering; send the request again"}')


@dataclass(frozen=True)
class Backends:
    """Where the server instances are: fixed addresses, or a DNS name with up to ``slots`` addresses."""
    addresses: tuple[tuple[str, int], ...] = ()
    dns_name: str = ""
    dns_port: int = 0
    slots: int = 0

    def lines(self) -> list[str]:
        check = "check inter 1s fall 2 rise 2"
        if self.dns_name:
            # Compose scales `mlflow` into several containers behind one name; HAProxy follows
            # the name as containers come and go.
            return [f"server-template mlflow 1-{self.slots} {self.dns_name}:{self.dns_port} {check} "
                    "resolvers dns init-addr none"]
        return [f"server mlflow-{i} {host}:{port} {check}" for i, (host, port) in enumerate(self.addresses, 1)]


def haproxy_config(*, bind: str, port: int, bundle: Path, backends: Backends, health_host: str) -> str:
    resolvers = [
        "resolvers dns",
        "    parse-resolv-conf",
        "    hold valid 5s",
        "",
    ] if backends.dns_name else []
    return "\n".join([
        "# Written by mlstack.balancer; rewritten at every start.",
        "global",
        "    log stdout format raw local0 info",
        f"    tune.bufsize {BUFFER_BYTES}",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "",
        *resolvers,
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 3s",
        f"    timeout client {TRANSFER_TIMEOUT}",
        f"    timeout server {TRANSFER_TIMEOUT}",
        "    timeout http-request 30s",
        "    timeout check 3s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "",
        "frontend tracking",
        f"    bind {bind}:{port} ssl crt {bundle} alpn http/1.1",
        "    http-request del-header X-Forwarded-For",
        "    http-request set-header X-Forwarded-Proto https",
        # Which requests may go again (see the module's docstring); retry-on in defaults, narrowed
        # here (HAProxy takes no http-request rule in a defaults section).
        "    acl metrics_write path_end /runs/log-batch /runs/log-metric",
        f"    acl upload_start_or_abort path_beg {MULTIPART}/create/ {MULTIPART}/abort/",
        "    http-request set-var(txn.replay_safe) bool(1) if !METH_POST or metrics_write or upload_start_or_abort",
        "    http-request disable-l7-retry if !{ var(txn.replay_safe) -m bool }",
        # An answer cut off after its headers (the instance died between writing its headers and
        # its body): held until its body is in, it becomes a 502 the client's retries send again,
        # rather than headers without a body, which no retry covers. Only a small answer of
        # declared length is held; a stream (no length) or a large file goes on as it comes.
        "    http-request set-var(txn.check_cut) bool(1) if { var(txn.replay_safe) -m bool } !METH_HEAD",
        "    acl check_cut var(txn.check_cut) -m bool",
        f"    acl small_body var(txn.declared_length) -m int le {CUT_CHECK_BYTES}",
        "    acl body_cut res.body_len,sub(txn.declared_length) lt 0",
        "    http-response set-var(txn.declared_length) res.hdr(content-length) if check_cut !{ status 204 304 }",
        f"    http-response wait-for-body time {CUT_WAIT} at-least {CUT_CHECK_BYTES} if check_cut small_body",
        f"    http-response return status 502 content-type application/json string '{CUT_ANSWER}' "
        "if check_cut small_body body_cut",
        "    option forwardfor",
        "    default_backend servers",
        "",
        "backend servers",
        "    balance leastconn",
        # The Host header MLflow's allowed-hosts check accepts for the instances' own address.
        f"    option httpchk",
        f"    http-check send meth GET uri {HEALTH_PATH} ver HTTP/1.1 hdr Host {health_host}",
        "    http-check expect status 200",
        "    default-server on-marked-down shutdown-sessions",
        *("    " + line for line in backends.lines()),
        "",
    ])


def public_host(env: dict[str, str]) -> str | None:
    return urlsplit(s.MLFLOW_PUBLIC_URL.get(env)).hostname


def main(argv: list[str] | None = None) -> int:
    """Compose's lb-init job: configuration and certificate for the HAProxy container."""
    parser = argparse.ArgumentParser(prog="python -m mlstack.balancer")
    parser.add_argument("directory", help="where haproxy.cfg and the certificate go (the lb volume)")
    parser.add_argument("--listen-port", type=int, default=8443)
    parser.add_argument("--servers", default="mlflow:5000", help="DNS name:port of the scaled MLflow service")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        for var in s.SERVICE_VARS["lb-init"]:
            var.get(env)
        slots = s.STACK_SERVERS.get_int(env)
        if slots < 1:
            raise s.SettingsError(f"environment variable STACK_SERVERS={slots} must be at least 1")
        out = Path(args.directory)
        tls = ensure_tls_material(out / "tls", s.TLS_CERT_FILE.get(env), s.TLS_KEY_FILE.get(env), public_host(env))
    except (s.SettingsError, CertificateError) as exc:
        raise SystemExit(f"lb-init: {exc}") from None
    name, _, port = args.servers.rpartition(":")
    config = haproxy_config(bind="0.0.0.0", port=args.listen_port, bundle=tls.bundle,
                            backends=Backends(dns_name=name, dns_port=int(port), slots=slots), health_host=name)
    (out / CONFIG_NAME).write_text(config)
    print(f"[lb-init] TLS certificate {'made' if tls.made_now else 'kept'}: {tls.certificate}", flush=True)
    print(f"[lb-init] SHA-256 fingerprint: {tls.fingerprint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
