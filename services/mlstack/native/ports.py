"""The native stack's listening ports: one place for their variables and defaults, and the check
that every one is free before anything starts.

A port taken by another program is found before PostgreSQL, SeaweedFS or MLflow start, so a
failed ``up`` leaves nothing half-started, and the message names the variable that moves it.
(``.env``'s ``DB_PORT``/``MLFLOW_PORT`` describe the compose network and do not apply here.)
"""

from __future__ import annotations

from dataclasses import dataclass

from mlstack.native.processes import free_port, port_open


@dataclass(frozen=True)
class PublicPort:
    key: str  # as stored in the state file's "ports"
    service: str  # the service (mlstack.native.stack.SERVICES) that listens on it
    variable: str  # the environment variable that chooses it
    default: int
    what: str  # for messages


PUBLIC_PORTS = (
    PublicPort("db", "postgres", "STACK_DB_PORT", 15432, "PostgreSQL"),
    PublicPort("s3", "s3", "STACK_S3_PORT", 18333, "the S3 server"),
    PublicPort("mlflow", "mlflow", "STACK_MLFLOW_PORT", 5000, "the MLflow server"),
)


class PortError(RuntimeError):
    pass


def busy_public_ports(ports: dict[str, int], starting: set[str]) -> list[str]:
    """One line per problem among the public ports of the services about to start: a port that
    another process listens on, or two services given the same port."""
    problems = []
    chosen = [p for p in PUBLIC_PORTS if p.service in starting]
    for p in chosen:
        port = ports[p.key]
        if port_open(port):
            problems.append(f"port {port} ({p.what}) is already in use by another process: "
                            f"set {p.variable} to a free port, e.g. `{p.variable}={_suggest(port)} make stack`")
    by_port: dict[int, list[str]] = {}
    for p in PUBLIC_PORTS:
        by_port.setdefault(ports[p.key], []).append(p.variable)
    problems += [f"{' and '.join(names)} are all {port}: give each its own port"
                 for port, names in by_port.items() if len(names) > 1]
    return problems


def _suggest(port: int) -> int:
    candidate = port + 1
    while candidate < 65536 and port_open(candidate):
        candidate += 1
    return candidate if candidate < 65536 else free_port()


def reassign_busy_internal(internal: dict[str, int], public: dict[str, int]) -> dict[str, str]:
    """SeaweedFS's own ports (master, volume, filer, gRPC) are the launcher's choice, not the
    user's: one taken since the last start, or clashing with a public port, gets a new free one.
    The data does not depend on them (volumes and the filer store are found by directory, and
    the master learns the volume's address afresh from its heartbeat). Returns what moved."""
    moved = {}
    taken = set(public.values())
    for name, port in list(internal.items()):
        if port in taken or port_open(port):
            new = free_port()
            while new in taken:
                new = free_port()
            internal[name] = new
            moved[name] = f"{port} -> {new}"
        taken.add(internal[name])
    return moved
