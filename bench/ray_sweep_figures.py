"""The wall time of one Ray sweep on a cluster of one node vs two (the issue's figure).

Usage: .venv/bin/python bench/ray_sweep_figures.py [--trials 4] [--steps 8] [--repeat 2]

Starts its own native stack on free loopback ports, then for each repetition, in alternating
order, a Ray cluster of one node (a head) and of two (a head and a worker), each node started with
``ray start`` with 1 CPU (tests/integration/ray_cluster.py, the cluster the test uses). The same
sweep (configs/tiny.yaml, ``--trials`` trials of ``--steps`` steps, 2 at a time, a save and an
eval every ``--steps``/2 steps) runs against each; the clock runs around the ``mltrainer sweep``
command, from its start (joining the cluster) to its exit. Each run is checked: exit 0, every
trial FINISHED, and the Ray nodes its trials ran on (their ``mltrainer.ray.node_id`` tags).

Prints a table, writes bench/results/ray-sweep-<UTC timestamp>.json, stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "integration")]

from mlflow.tracking import MlflowClient  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402
from running_stack import RunningStack, environ_set, free_stack_ports  # noqa: E402

from mlstack.native.stack import Stack  # noqa: E402
from mltrainer.sweep.tags import TAG_RAY_NODE  # noqa: E402

RESULTS = HERE / "results"


def sweep_file(path: Path, name: str, trials: int, steps: int, address: str) -> Path:
    every = max(1, steps // 2)
    path.write_text(yaml.safe_dump({
        "name": name, "base": str(REPO / "configs" / "tiny.yaml"),
        "overrides": [f"training.max_steps={steps}", f"training.save_steps={every}", f"training.eval_steps={every}",
                      "training.logging_steps=1", "data.max_train_samples=64", "data.max_eval_samples=32"],
        "search": {"space": {"training.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True}},
                   "trials": trials, "metric": "eval_loss", "direction": "minimize", "backend": "ray",
                   "algorithm": "random", "seed": 3, "parallel": 2, "ray_address": address},
    }, sort_keys=False))
    return path


def one_sweep(stack: RunningStack, nodes: int, args, work: Path, label: str) -> dict:
    client = MlflowClient(stack.uri)
    experiment = f"ray-bench-{label}"
    with RayCluster() as cluster:
        cluster.start_head()
        for _ in range(nodes - 1):
            cluster.add_worker()
        cluster.wait_ready()
        sweep = sweep_file(work / f"{label}.yaml", label, args.trials, args.steps, cluster.address)
        env = {**stack.client_env(), **cluster.client_env(), "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "mltrainer.cli", "sweep", "--config", str(sweep),
               "--set", f"output_root={work / label}", "--set", f"experiment.name={experiment}"]
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        ids = {node.node_id: node.name for node in cluster.nodes}
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {label} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    exp = client.get_experiment_by_name(experiment)
    kids = client.search_runs([exp.experiment_id], "tags.`mltrainer.trial` != ''")
    states = sorted(k.info.status for k in kids)
    if states != ["FINISHED"] * args.trials:
        raise RuntimeError(f"sweep {label}: trial runs {states}, expected {args.trials} FINISHED")
    trials = [{"trial": int(k.data.tags["mltrainer.trial"]), "node": ids.get(k.data.tags.get(TAG_RAY_NODE), "?"),
               "seconds": (k.info.end_time - k.info.start_time) / 1000} for k in kids]
    return {"nodes": nodes, "wall_s": round(wall, 2), "trials": sorted(trials, key=lambda t: t["trial"]),
            "trials_per_node": {n: sum(t["node"] == n for t in trials) for n in sorted(set(ids.values()))},
            "loadavg_before": load_before, "loadavg_after": load_after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    state_dir = Path(tempfile.mkdtemp(prefix="mlstack-raybench-"))
    work = Path(tempfile.mkdtemp(prefix="raybench-"))
    runs = []
    began = time.perf_counter()
    try:
        with environ_set(free_stack_ports()):
            stack = Stack(state_dir)
            try:
                running = RunningStack(stack, stack.up())
                os.environ.update({k: v for k, v in running.client_env().items() if k.startswith("MLFLOW_TRACKING_")})
                for rep in range(args.repeat):
                    order = (1, 2) if rep % 2 == 0 else (2, 1)  # neither case always goes first
                    for nodes in order:
                        label = f"r{rep}-n{nodes}-{int(time.time())}"
                        result = one_sweep(running, nodes, args, work, label)
                        runs.append(result)
                        print(f"repetition {rep}: {nodes} node(s) {result['wall_s']:.1f} s "
                              f"trials per node {result['trials_per_node']}", flush=True)
            finally:
                Stack(state_dir).down()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for nodes in (1, 2):
        walls = [r["wall_s"] for r in runs if r["nodes"] == nodes]
        summary[f"{nodes}_nodes"] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls)}
    speedup = summary["1_nodes"]["median_s"] / summary["2_nodes"]["median_s"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.output or RESULTS / f"ray-sweep-{stamp}.json"
    out.write_text(json.dumps({
        "what": "wall time of `mltrainer sweep` (ray backend, parallel 2) on a Ray cluster of 1 vs 2 nodes, 1 CPU each",
        "settings": {"trials": args.trials, "steps": args.steps, "repeat": args.repeat, "parallel": 2,
                     "model": "configs/tiny.yaml (tiny BERT from config)"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "cores shared with other work on the host; see loadavg per run"},
        "summary": {**summary, "speedup_2_vs_1": round(speedup, 3)},
        "runs": runs, "total_s": round(time.perf_counter() - began, 1),
    }, indent=2) + "\n")
    print(f"\n1 node: median {summary['1_nodes']['median_s']:.1f} s, 2 nodes: median "
          f"{summary['2_nodes']['median_s']:.1f} s, speedup {speedup:.2f}x\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
