"""A Ray cluster of separate nodes on this machine, started the way an operator starts one:
``ray start --head`` and ``ray start --address`` per worker (test_ray_cluster.py, and
bench/ray_sweep_figures.py for the one- vs two-node figures).

Each node is a ``ray start --block`` process leading its own process group, with its own temp
dir, so it can be killed alone (SIGKILL to its group takes its raylet and its workers with it) and
stopped without ``ray stop``, which stops every Ray process on the machine, other users' included.
The nodes run with token authentication and a token of their own: nothing here depends on a
token in ``~/.ray`` or lets another cluster's driver in.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlstack.native.processes import free_port

RAY = Path(sys.executable).with_name("ray")
STOP_GRACE_S = 2
# The head notices a dead node after its health checks fail: 1 s apart, 5 in a row (Ray's defaults,
# 3 s apart, take 15 s or more: a good part of the test's budget).
HEAD_HEALTH_CHECK_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "store": n["ObjectStoreSocketName"]} for n in ray.nodes()]))
"""


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    proc: subprocess.Popen
    log: Path
    node_id: str | None = None

    def kill(self) -> None:
        """SIGKILL the node's whole process group: ray start, raylet, agents and the trials' workers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # The group, not just the leader: a raylet's workers can outlive ray start's own exit.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@dataclass
class RayCluster:
    """Nodes of one cluster with 1 CPU each; use as a context manager so every node is stopped."""
    cpus_per_node: int = 1
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rayc-")))  # short: socket paths
    nodes: list[RayNode] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a driver (the sweep) needs in its environment to join this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, name: str, args: list[str], extra_env: dict[str, str]) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        log = self.root / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.client_env(), **extra_env)
        cmd = [str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus_per_node),
               "--temp-dir", str(temp_dir), "--dashboard-agent-listen-port", str(free_port()),
               "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats", "--block"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = RayNode(name, temp_dir, proc, log)
        self.nodes.append(node)
        return node

    def start_head(self) -> RayNode:
        return self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                    "--dashboard-port", str(free_port())], HEAD_HEALTH_CHECK_ENV)

    def add_worker(self, extra_env: dict[str, str] | None = None) -> RayNode:
        return self._start(f"worker{len(self.nodes)}", ["--address", self.address], extra_env or {})

    def wait_ready(self, timeout: float = 120) -> None:
        """Until every started node is alive in the cluster; sets each node's ``node_id``."""
        deadline = time.monotonic() + timeout
        listed: list[dict] = []
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited with {node.proc.returncode}:\n"
                                       f"{node.log.read_text(errors='replace')[-3000:]}")
            listed = self.list_nodes()
            for node in self.nodes:
                found = [n for n in listed if n["alive"] and n["store"].startswith(f"{node.temp_dir}/")]
                node.node_id = found[0]["id"] if found else None
            if all(node.node_id for node in self.nodes):
                return
            time.sleep(1)
        raise TimeoutError(f"ray nodes not all up after {timeout:.0f} s; the cluster lists {listed}")

    def list_nodes(self) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.client_env())
        proc = subprocess.run([sys.executable, "-c", NODES_SCRIPT, self.address], env=env, capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            return []
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def alive(self, node: RayNode) -> bool:
        return any(n["id"] == node.node_id and n["alive"] for n in self.list_nodes())

    def stop(self) -> None:
        errors = []
        for node in reversed(self.nodes):  # workers first, the head last
            try:
                node.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others all the same
                errors.append(f"{node.name}: {exc}")
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise RuntimeError("could not stop ray nodes: " + "; ".join(errors))

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
