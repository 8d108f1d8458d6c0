"""Benchmarks of the stack and the trainer, each case next to its baseline in the same run.

    .venv/bin/python bench/bench.py [--smoke] [--cases train,transfer,resume,metrics,dedup] [--repeat 3]
                                    [--transfer-mb 1000] [--tracking-uri URI] ...   (make bench ARGS=...)

Without ``--tracking-uri`` it starts its own native stack (embedded PostgreSQL, SeaweedFS, MLflow)
on free loopback ports in a temporary state directory and stops it at the end. With it, it uses a
running stack: MLflow credentials from MLFLOW_TRACKING_USERNAME/PASSWORD, and for the boto3
baselines the S3 endpoint/key/bucket from BENCH_S3_ENDPOINT, BENCH_S3_KEY, BENCH_S3_SECRET,
BENCH_S3_BUCKET (cases without them report "n/a"); ``--mlflow-pid`` for the server memory figure.

Every measurement runs in a fresh subprocess (bench/worker.py); the cases of one comparison
alternate (A B C, A B C, ...), and the table gives medians with min-max. Clients that talk to
MLflow see only the tracking URI and the trainer user's credentials, never an S3 key.

Writes bench/results/bench-<UTC timestamp>[-smoke].json with the machine's description (cores,
memory, versions, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
MB = 1_000_000
sys.path.insert(0, str(HERE))

from host import gpu_description, machine, write_random  # noqa: E402
from worker import train_sets  # noqa: E402

CASES = ("train", "transfer", "resume", "metrics", "dedup")
# The training case's modes (bench/worker.py's train): none, stock and ours by default, boto3
# (the floor) where an S3 server is known; apart (our uploader in a separate process) on request.
TRAIN_MODES_DEFAULT = ("none", "stock", "ours")
TRAIN_MODES = (*TRAIN_MODES_DEFAULT, "boto3", "apart")
MINILM = REPO / ".models" / "all-MiniLM-L6-v2"
TINY = REPO / "configs" / "models" / "tiny-bert"


# -- plumbing ---------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, mlflow_env: dict[str, str], s3: dict[str, str] | None, work: Path,
                 service_pids: dict[str, int]):
        self.args, self.mlflow_env, self.s3, self.work = args, mlflow_env, s3, work
        # The stack's processes the bench knows, by service (postgres, s3, mlflow): all three on its
        # own stack, at most MLflow's on an external one. Their CPU is what tracked runs also cost.
        self.service_pids = service_pids

    @property
    def mlflow_pid(self) -> int | None:
        return self.service_pids.get("mlflow")

    @property
    def stack_pids(self) -> list[int]:
        return list(self.service_pids.values())

    def client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "S3_", "BENCH_S3"))}
        env.update(self.mlflow_env)
        # bench/ first; a PYTHONPATH of the caller's stays (bench/gpu_case.sh installs there)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        return env

    def s3_env(self) -> dict[str, str]:
        env = self.client_env()
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        env.update(self.s3 or {})
        return env

    def worker(self, kind: str, payload: dict, *, sample_rss: bool = False) -> dict:
        out = self.work / f"result-{kind}-{time.monotonic_ns()}.json"
        env = self.s3_env() if kind.startswith("boto3") or payload.get("mode") == "boto3" else self.client_env()
        sampler = RssSampler(self.mlflow_pid) if sample_rss and self.mlflow_pid else None
        if sampler:
            sampler.start()
        service_cpu = {name: tree_cpu_seconds([pid]) for name, pid in self.service_pids.items()}
        proc = subprocess.run([sys.executable, str(HERE / "worker.py"), kind, json.dumps(payload), str(out)],
                              env=env, capture_output=True, text=True)
        if sampler:
            sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
        out.unlink()
        if self.service_pids:
            result["service_cpu_s"] = {name: round(tree_cpu_seconds([pid]) - service_cpu[name], 2)
                                       for name, pid in self.service_pids.items()}
            result["stack_cpu_s"] = round(sum(result["service_cpu_s"].values()), 2)
        if sampler:
            result["server_rss_growth_mib"] = sampler.growth_mib()
        return result


class RssSampler(threading.Thread):
    """Peak RSS of the MLflow server's process tree (gunicorn master + workers) over its value at start."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.base = tree_rss(pid)
        self.peak = self.base
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def growth_mib(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes and all their descendants so far."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def balanced_order(items: list, rep: int) -> list:
    """The order of ``items`` in repetition ``rep``, from a Williams design: over n repetitions
    (2n for an odd n) every case runs once in every position and once right after every other.

    A plain rotation (A B C, B C A, ...) puts every case at every position but always after the
    same neighbour, and on a VM a case leaves after-effects on the next one (1 GB just deleted
    on a disk mounted with ``discard``, memory handed back to the host, an object just written):
    the rotation charged them to one case. Measured in the transfer case, that one was ours.
    """
    n = len(items)
    first = [(j + 1) // 2 if j % 2 else (n - j // 2) % n for j in range(n)]  # 0, 1, n-1, 2, n-2, ...
    r = rep % (n if n % 2 == 0 else 2 * n)
    order = [items[(k + r) % n] for k in first]
    return order[::-1] if r >= n else order


def summary(values: list[float], digits: int = 3) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values), "values": [round(v, digits) for v in values]}


def ratio(a: dict, b: dict) -> float | None:
    if not a.get("median") or not b.get("median"):
        return None
    return round(a["median"] / b["median"], 2)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_choice(name: str) -> dict:
    """tiny: tiny-bert tokenizer with a 128-hidden/4-layer BERT built from config; minilm: real MiniLM."""
    if name == "minilm":
        if not MINILM.is_dir():
            raise SystemExit(f"{MINILM} not found: run `make demo` once (it exports MiniLM there), or use --*-model tiny")
        return {"model_dir": str(MINILM), "from_config": False, "config_overrides": {}}
    if name == "tiny":
        return {"model_dir": str(TINY), "from_config": True,
                "config_overrides": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                                     "intermediate_size": 512}}
    if name == "tiny32":  # the test config's 32-hidden/2-layer model: for --smoke
        return {"model_dir": str(TINY), "from_config": True, "config_overrides": {}}
    if name == "large":  # BERT-large's shape (335M parameters), from config: a 4 GB checkpoint, for a GPU
        return {"model_dir": str(TINY), "from_config": True,
                "config_overrides": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                     "intermediate_size": 4096}}
    raise SystemExit(f"unknown model {name!r}: tiny, tiny32, minilm or large")


# -- case 1: training cost of tracking ----------------------------------------------------------------


def case_train(b: Bench) -> dict:
    a = b.args
    payload = {**model_choice(a.train_model), "steps": a.train_steps, "save_every": a.save_every,
               "batch_size": a.batch_size, "max_length": a.max_length, "work": str(b.work),
               "torch_threads": a.torch_threads, "device": a.device, "drop_stored": a.drop_stored}
    modes = a.train_modes or [*TRAIN_MODES_DEFAULT, *(["boto3"] if b.s3 else [])]
    if "boto3" in modes and not b.s3:
        raise SystemExit("--train-modes boto3 needs an S3 server: none with --tracking-uri and no BENCH_S3_*")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for rep in range(a.repeat):
        for mode in balanced_order(modes, rep):
            os.sync()  # no writeback of the last run's checkpoints during this one
            r = b.worker("train", {**payload, "mode": mode})
            log(f"train rep {rep + 1}/{a.repeat} {mode}: {r['wall_s']:.2f} s, median step {1000 * r['median_step_s']:.1f} ms" +
                (f" ({r['manifests']} manifests / {r['expected_saves']} saves, waits {r['queue_waits']}, "
                 f"final wait {r['final_wait_s']:.2f} s)" if "manifests" in r else ""))
            runs[mode].append(r)
    walls = {m: summary([r["wall_s"] for r in rs]) for m, rs in runs.items()}
    steps = {m: summary([r["median_step_s"] for r in rs], 4) for m, rs in runs.items()}
    cpu = {m: {"trainer": summary([r["cpu_s"] for r in rs], 2), "stack": summary([r.get("stack_cpu_s") for r in rs], 2)}
           for m, rs in runs.items()}
    ours = runs.get("ours") or runs.get("apart") or []
    with_none = {f"ratio_{m}_vs_none": ratio(walls[m], walls["none"]) if m in walls else None
                 for m in TRAIN_MODES if m != "none"}  # every key, None for a mode not run
    return {
        "model": a.train_model, "device": a.device, "steps": a.train_steps, "save_every": a.save_every,
        "batch_size": a.batch_size, "max_length": a.max_length,
        "torch_threads": a.torch_threads,
        "checkpoint_mb": round(ours[0]["checkpoint_bytes"] / MB, 1) if ours else None,
        "modes": modes, "wall_s": walls, "median_step_s": steps, "cpu_s": cpu,
        "final_wait_s": summary([r["final_wait_s"] for r in runs.get("ours", [])], 2),
        "final_wait_apart_s": summary([r["final_wait_s"] for r in runs.get("apart", [])], 2),
        **with_none,
        "ratio_ours_vs_boto3": ratio(walls["ours"], walls["boto3"]) if {"ours", "boto3"} <= walls.keys() else None,
        "manifests_equal_saves": all(r["manifests"] == r["expected_saves"]
                                     for m in ("ours", "apart") for r in runs.get(m, [])),
        "manifests": [r["manifests"] for r in runs.get("ours", [])],
        "manifests_apart": [r["manifests"] for r in runs.get("apart", [])],
        "expected_saves": a.train_steps // a.save_every,
        "queue_waits_s": [sum(r["queue_waits"]) for r in runs.get("ours", [])],
    }


# -- case 2: checkpoint transfer ---------------------------------------------------------------------


def make_checkpoint(root: Path, total: int) -> Path:
    """Shaped like a Trainer checkpoint: optimizer ~2/3, weights ~1/3, a few small files."""
    root.mkdir(parents=True, exist_ok=True)
    small = {"scheduler.pt": 1_500, "rng_state.pth": 14_000, "trainer_state.json": 4_000,
             "training_args.bin": 5_500, "config.json": 700, "tokenizer.json": 700_000}
    rest = total - sum(small.values())
    sizes = {"optimizer.pt": rest * 2 // 3, "model.safetensors": rest - rest * 2 // 3, **small}
    for name, size in sizes.items():
        write_random(root / name, size)
    return root


def case_transfer(b: Bench) -> dict:
    a = b.args
    size = a.transfer_mb * MB
    src = make_checkpoint(b.work / "ckpt-src", size)
    total = sum(f.stat().st_size for f in src.iterdir())  # 8 files
    up = {"ours": [], "proxied": [], "boto3": [], "local": []}
    down = {"ours": [], "proxied": [], "boto3": [], "local": []}
    rss_up, rss_down = [], []
    # CPU-s of each process taking part, per transfer: where a path's CPU goes, which on 2 shared
    # cores decides its speed, and which varies far less from run to run than the speed does.
    cpu = {kind: {mode: [] for mode in ("ours", "proxied", "boto3")} for kind in ("upload", "download")}
    uploaded: dict[str, str] = {}  # what this repetition's uploads left for its downloads

    def run(kind: str, payload: dict, *, sample_rss: bool = False, mode: str | None = None) -> dict:
        # Every transfer starts with no dirty pages left by the one before: otherwise whichever
        # case runs right after the 1 GB uploads pays for their writeback.
        os.sync()
        r = b.worker(kind, payload, sample_rss=sample_rss)
        if mode:
            cpu["upload" if kind.endswith("upload") else "download"][mode].append(
                {"client": r["client_cpu_s"], **r.get("service_cpu_s", {})})
        return r

    def up_ours() -> None:
        r = run("ours-upload", {"src": str(src), "work": str(b.work)}, mode="ours")
        up["ours"].append(r["seconds"])
        uploaded["run"] = r["run_id"]
        # Where those objects sit in the bucket (the server's artifact root is s3://<bucket>/artifacts),
        # so boto3 downloads the very objects ours does: a comparison of clients, not of objects.
        uploaded["ours_prefix"] = "artifacts/" + r["artifact_uri"].removeprefix("mlflow-artifacts:/") + "/checkpoints/step-1"

    def up_proxied() -> None:
        # The same client made to send every byte through the server: the path of a stack without
        # S3_PUBLIC_ENDPOINT_URL, and the one whose memory must not grow with the file.
        r = run("ours-upload", {"src": str(src), "work": str(b.work), "proxied": True}, sample_rss=True, mode="proxied")
        up["proxied"].append(r["seconds"])
        rss_up.append(r.get("server_rss_growth_mib"))

    def up_boto3() -> None:
        r = run("boto3-upload", {"src": str(src)}, mode="boto3")
        up["boto3"].append(r["seconds"])

    def down_ours(proxied: bool = False) -> None:
        r = run("ours-download", {"run_id": uploaded["run"], "work": str(b.work), "proxied": proxied},
                sample_rss=proxied, mode="proxied" if proxied else "ours")
        assert r["bytes"] == total, r
        down["proxied" if proxied else "ours"].append(r["seconds"])
        if proxied:
            rss_down.append(r.get("server_rss_growth_mib"))

    def down_boto3() -> None:
        r = run("boto3-download", {"prefix": uploaded["ours_prefix"], "skip": ["manifest.json"], "work": str(b.work)},
                mode="boto3")
        assert r["bytes"] == total, r
        down["boto3"].append(r["seconds"])

    def local(into: dict) -> None:
        into["local"].append(run("local-copy", {"src": str(src), "work": str(b.work)})["seconds"])

    uploads = [up_ours, up_proxied, *([up_boto3] if b.s3 else []), lambda: local(up)]
    downloads = [down_ours, lambda: down_ours(proxied=True), *([down_boto3] if b.s3 else []), lambda: local(down)]
    for rep in range(a.repeat):
        for step in balanced_order(uploads, rep) + balanced_order(downloads, rep):
            step()
        last = lambda d: f"{d[-1]:.2f} s" if d else "n/a"  # noqa: E731
        log(f"transfer rep {rep + 1}/{a.repeat}: up ours {last(up['ours'])}, proxied {last(up['proxied'])}, "
            f"boto3 {last(up['boto3'])}; down ours {last(down['ours'])}, proxied {last(down['proxied'])}, "
            f"boto3 {last(down['boto3'])}; server RSS +{rss_up[-1]}/+{rss_down[-1]} MiB (proxied)")
    shutil.rmtree(src, ignore_errors=True)

    def rates(seconds: list[float]) -> dict:
        return summary([total / MB / s for s in seconds], 1)

    def per_gb(samples: list[dict]) -> dict:
        """Median CPU-s per GB moved, by process (client, and the stack's services the bench knows)."""
        return {who: summary([x[who] * 1000 * MB / total for x in samples], 2) for who in samples[0]}

    result = {"bytes": total, "files": 8}
    for kind, data in (("upload", up), ("download", down)):
        rs = {k: rates(v) for k, v in data.items()}
        result[kind] = {"mb_per_s": rs, "seconds": {k: summary(v) for k, v in data.items()},
                        "ratio_ours_vs_boto3": ratio(rs["ours"], rs["boto3"]) if data["boto3"] else None,
                        "ratio_proxied_vs_boto3": ratio(rs["proxied"], rs["boto3"]) if data["boto3"] else None,
                        "cpu_s_per_gb": {mode: per_gb(samples) for mode, samples in cpu[kind].items() if samples}}
    result["server_rss_growth_mib"] = {"upload": summary(rss_up, 1), "download": summary(rss_down, 1)}
    return result


# -- case 3: resume latency ------------------------------------------------------------------------------


def time_to_first_step(b: Bench, argv: list[str], timeout: float = 600) -> float:
    """Seconds from starting ``mltrainer`` to its "first training step started" log line; then stop it."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mltrainer"), *argv], env=b.client_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    tail: list[str] = []
    try:
        for line in proc.stderr:
            tail = (tail + [line])[-40:]
            if "first training step started" in line:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                break
        raise RuntimeError(f"mltrainer never reached its first step:\n{''.join(tail)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def case_resume(b: Bench) -> dict:
    a = b.args
    payload = {**model_choice(a.resume_model), "steps": 1, "save_every": 1, "batch_size": a.batch_size,
               "max_length": a.max_length, "work": str(b.work), "experiment": "bench-resume", "mode": "ours"}
    setup = b.worker("train", payload)
    run_id = setup["run_id"]
    log(f"resume: run {run_id} holds a {setup['checkpoint_bytes'] / MB:.0f} MB checkpoint")
    sets = train_sets({**payload, "steps": 2})
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), *[x for s in sets for x in ("--set", s)]]
    from mlflow.tracking import MlflowClient

    from mltrainer.lease import LEASE_TAG

    os.environ.update(b.mlflow_env)
    client = MlflowClient()
    prefix = None
    if b.s3:
        run = client.get_run(run_id)
        prefix = (f"artifacts/{run.info.experiment_id}/{run_id}/artifacts/checkpoints/step-00000001")
    resume, fresh, direct = [], [], []
    for rep in range(a.repeat):
        # Each repetition resumes a crashed run: a FINISHED one is not resumed, and the resumer
        # stopped at its first step still holds its lease (it is measured, not waited for).
        client.set_terminated(run_id, "FAILED")
        if LEASE_TAG in client.get_run(run_id).data.tags:  # the run's first trainer took none
            client.delete_tag(run_id, LEASE_TAG)
        resume.append(time_to_first_step(b, [*argv, "--resume", run_id]))
        fresh.append(time_to_first_step(b, argv))
        if prefix:
            r = b.worker("boto3-download", {"prefix": prefix, "work": str(b.work)})
            assert r["bytes"] >= setup["checkpoint_bytes"], (r, setup["checkpoint_bytes"])  # + the manifest
            direct.append(r["seconds"])
        log(f"resume rep {rep + 1}/{a.repeat}: resume {resume[-1]:.2f} s, fresh start {fresh[-1]:.2f} s"
            + (f", boto3 download {direct[-1]:.2f} s" if direct else ""))
    res, fr, bo = summary(resume), summary(fresh), summary(direct)
    extra = summary([r - f for r, f in zip(resume, fresh)])
    return {"model": a.resume_model, "checkpoint_mb": round(setup["checkpoint_bytes"] / MB, 1),
            "resume_to_first_step_s": res, "fresh_to_first_step_s": fr, "boto3_download_s": bo,
            "resume_extra_s": extra,
            "ratio_resume_vs_boto3": ratio(res, bo) if direct else None,
            "ratio_resume_vs_fresh_plus_boto3": (round(res["median"] / (fr["median"] + bo["median"]), 2)
                                                 if direct else None),
            "ratio_extra_vs_boto3": ratio(extra, bo) if direct else None}


# -- case 4: metric logging --------------------------------------------------------------------------------


def case_metrics(b: Bench) -> dict:
    a = b.args
    trainer = []
    for rep in range(a.repeat):
        r = b.worker("metrics-trainer", {"steps": a.metric_steps, "metrics_per_step": 10})
        assert r["stored_steps"] == a.metric_steps, r
        trainer.append(r)
        log(f"metrics rep {rep + 1}/{a.repeat}: trainer side {r['points'] / r['enqueue_s']:.0f} points/s enqueued, "
            f"{r['points'] / r['total_s']:.0f} points/s stored")
    # Server side: the load of bench/metrics_load.py (one process per client, each its own run, a
    # common start), so the figure here and the load balancer's (bench/lb_figures.py) are one load.
    from metrics_load import run_load

    # Where the CPU of a request goes (the clients', the server's, PostgreSQL's), since on a small
    # host they all share its cores; the server's and PostgreSQL's include the clients' start.
    cpu_of = {name: [b.service_pids[service]] for name, service in (("server", "mlflow"), ("postgres", "postgres"))
              if service in b.service_pids}
    server = []
    for rep in range(a.repeat):
        cpu_before = {name: tree_cpu_seconds(pids) for name, pids in cpu_of.items()}
        r = run_load(b.mlflow_env["MLFLOW_TRACKING_URI"], b.mlflow_env["MLFLOW_TRACKING_USERNAME"],
                     b.mlflow_env["MLFLOW_TRACKING_PASSWORD"], clients=a.metric_clients, requests=a.metric_requests,
                     batch=100, client="mlflow", experiment="bench-metrics")
        if r["errors"]:
            raise RuntimeError(f"metrics load: {r['errors']} requests refused, e.g. {r['error_samples'][:2]}")
        r["cpu_ms_per_request"] = {"clients": r["client_cpu_ms_per_request"], **{
            name: round(1000 * (tree_cpu_seconds(cpu_of[name]) - before) / r["requests"], 2)
            for name, before in cpu_before.items()}}
        server.append(r)
        log(f"metrics rep {rep + 1}/{a.repeat}: {a.metric_clients} clients {r['points_per_s']:.0f} points/s, "
            f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; CPU ms per request {r['cpu_ms_per_request']}")
    return {
        "trainer": {"steps": a.metric_steps, "metrics_per_step": 10,
                    "call_p50_ms": summary([r["call_p50_ms"] for r in trainer]),
                    "call_p99_ms": summary([r["call_p99_ms"] for r in trainer]),
                    "enqueued_points_per_s": summary([r["points"] / r["enqueue_s"] for r in trainer], 0),
                    "stored_points_per_s": summary([r["points"] / r["total_s"] for r in trainer], 0)},
        "server": {"clients": a.metric_clients, "points_per_request": 100, "requests_per_client": a.metric_requests,
                   "points_per_s": summary([s["points_per_s"] for s in server], 0),
                   "p50_ms": summary([s["p50_ms"] for s in server], 1),
                   "p99_ms": summary([s["p99_ms"] for s in server], 1),
                   "cpu_ms_per_request": {name: summary([s["cpu_ms_per_request"].get(name) for s in server], 1)
                                          for name in ("clients", "server", "postgres")}},
    }


# -- case 5: dedup ----------------------------------------------------------------------------------------------


def case_dedup(b: Bench) -> dict:
    a = b.args
    payload = {**model_choice(a.train_model), "steps": a.dedup_saves * 2, "save_every": 2,
               "batch_size": a.batch_size, "max_length": a.max_length, "work": str(b.work), "mode": "ours",
               "experiment": "bench-dedup"}
    r = b.worker("train", payload)
    log(f"dedup: {r['manifests']} checkpoints, {r['uploaded_bytes'] / MB:.1f} MB uploaded of "
        f"{r['folder_bytes'] / MB:.1f} MB in the folders")
    return {"checkpoints": r["manifests"], "folder_bytes": r["folder_bytes"], "uploaded_bytes": r["uploaded_bytes"],
            "deduplicated_bytes": r["deduplicated_bytes"],
            "uploaded_fraction": round(r["uploaded_bytes"] / r["folder_bytes"], 3) if r["folder_bytes"] else None}


# -- report --------------------------------------------------------------------------------------------------


def fmt(s: dict | None, unit: str = "", digits: int = 2) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# The targets the table prints next to each ratio (issue 18's): one place, so the table and the
# issue never disagree.
TARGETS = {
    "training": "<= 1.02x",
    "direct transfer": ">= 0.95x",
    "proxied transfer": ">= 0.9x",
    "resume extra": "<= 1.1x",
    "resume": "<= 1.2x",
    "server rss": "< 300",
}


def rx(value, target: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}x" + (f"  [target {target}]" if target else "")


def points_per_s_cores_allow(cpu_ms: dict, cores: int, points_per_request: int = 100) -> float | None:
    """Points per second the host's cores would allow the server and PostgreSQL if the clients ran
    elsewhere: a bound derived from the measured CPU per request, not a measurement."""
    server, postgres = cpu_ms["server"].get("median"), cpu_ms["postgres"].get("median")
    if not server or not postgres:
        return None
    return cores * 1000 / (server + postgres) * points_per_request


def table(r: dict) -> str:
    rows = [("case", "measure", "ours", "baseline", "ratio")]
    if t := r["cases"].get("train"):
        w, step = t["wall_s"], t["median_step_s"]
        rows += [
            ("1 training", f"wall s, {t['steps']} steps, save/{t['save_every']} ({t['checkpoint_mb']} MB ckpt), " +
                           ("GPU" if t.get("device") == "cuda" else f"{t.get('torch_threads') or 'all'} torch thread(s)"),
             fmt(w.get("ours"), " s"), "none " + fmt(w["none"], " s"),
             rx(t.get("ratio_ours_vs_none"), TARGETS["training"])),
            ("", "stock MLflowCallback (artifacts)", fmt(w.get("stock"), " s"), "none", rx(t.get("ratio_stock_vs_none"))),
            ("", "  the same saves by boto3 on a thread (no tracking)", fmt(w.get("boto3"), " s"), "none",
             rx(t.get("ratio_boto3_vs_none"))),
            ("", "  ours against that floor", "", "boto3 thread", rx(t.get("ratio_ours_vs_boto3"))),
        ]
        if "apart" in w:
            rows += [("", "ours with the uploader in a separate process", fmt(w["apart"], " s"), "none",
                      rx(t.get("ratio_apart_vs_none"))),
                     ("", "  waiting for the last upload at the end", fmt(t["final_wait_apart_s"], " s"), "", "")]
        rows += [
            ("", "median step, ms: " + " / ".join(step), " / ".join(f"{1000 * step[m]['median']:.1f}" for m in step), "", ""),
            ("", "manifests == saves", str(t["manifests_equal_saves"]), f"{t['expected_saves']} saves", ""),
            ("", "  waiting for the last upload at the end (ours)", fmt(t["final_wait_s"], " s"), "", ""),
        ]
        if "ours" in t["cpu_s"] and t["cpu_s"]["ours"]["stack"]:
            c = t["cpu_s"]
            rows += [("", "  CPU-s of the training process", fmt(c["ours"]["trainer"], ""), "none " + fmt(c["none"]["trainer"], ""), ""),
                     ("", "  CPU-s of the stack (PG, S3, MLflow) meanwhile", fmt(c["ours"]["stack"], ""),
                      "none " + fmt(c["none"]["stack"], ""), "")]
    if x := r["cases"].get("transfer"):
        for kind in ("upload", "download"):
            m = x[kind]["mb_per_s"]
            rows.append(("2 transfer", f"{kind} {x['bytes'] / MB:.0f} MB ckpt, MB/s", fmt(m["ours"], "", 1),
                         "boto3 " + fmt(m["boto3"], "", 1), rx(x[kind]["ratio_ours_vs_boto3"], TARGETS["direct transfer"])))
            rows.append(("", "  all through the server (proxied), MB/s", fmt(m["proxied"], "", 1), "boto3",
                         rx(x[kind]["ratio_proxied_vs_boto3"], TARGETS["proxied transfer"])))
            rows.append(("", f"  local disk copy (ceiling), MB/s", "", fmt(m["local"], "", 1), ""))
            if c := x[kind].get("cpu_s_per_gb"):
                who = [w for w in ("client", "mlflow", "s3") if all(w in c[mode] for mode in c)]

                def cpu_of(mode: str) -> str:
                    return " / ".join(f"{c[mode][w]['median']:.2f}" for w in who) if mode in c else "n/a"

                title = "CPU-s per GB, " + " / ".join(who)
                rows.append(("", f"  {title}: direct", cpu_of("ours"), "boto3 " + cpu_of("boto3"), ""))
                rows.append(("", f"  {title}: proxied", cpu_of("proxied"), "", ""))
        g = x["server_rss_growth_mib"]
        rows.append(("", "server RSS growth up/down (proxied), MiB", f"{fmt(g['upload'], '', 0)} / {fmt(g['download'], '', 0)}",
                     "", f"[target {TARGETS['server rss']}]"))
    if s := r["cases"].get("resume"):
        rows += [("3 resume", f"to first step, {s['checkpoint_mb']} MB {s['model']} ckpt",
                  fmt(s["resume_to_first_step_s"], " s"), "boto3 dl " + fmt(s["boto3_download_s"], " s"),
                  rx(s["ratio_resume_vs_boto3"])),
                 # The target: the same start without --resume plus a plain download of the bytes
                 # (against the download alone, a resume would be charged torch's import and the
                 # model load that every start pays).
                 ("", "  vs fresh start + boto3 download", "", "fresh " + fmt(s["fresh_to_first_step_s"], " s"),
                  rx(s["ratio_resume_vs_fresh_plus_boto3"], TARGETS["resume"])),
                 ("", "  resume minus fresh start (download etc.)", fmt(s["resume_extra_s"], " s"), "boto3 dl",
                  rx(s["ratio_extra_vs_boto3"], TARGETS["resume extra"]))]
    if m := r["cases"].get("metrics"):
        t, sv = m["trainer"], m["server"]
        rows += [("4 metrics", "trainer log_metrics call p50/p99, ms",
                  f"{fmt(t['call_p50_ms'], '', 3)} / {fmt(t['call_p99_ms'], '', 3)}", "", ""),
                 ("", "trainer points/s enqueued / stored", f"{fmt(t['enqueued_points_per_s'], '', 0)} / "
                  f"{fmt(t['stored_points_per_s'], '', 0)}", "", ""),
                 ("", f"server, {sv['clients']} clients x log_batch(100): points/s", fmt(sv["points_per_s"], "", 0), "", ""),
                 ("", "  request latency p50 / p99, ms", f"{fmt(sv['p50_ms'], '', 0)} / {fmt(sv['p99_ms'], '', 0)}", "", "")]
        if cpu := sv.get("cpu_ms_per_request"):
            rows.append(("", "  CPU ms per request: clients / server / PostgreSQL",
                         " / ".join(fmt(cpu[name], "", 1) for name in ("clients", "server", "postgres")), "", ""))
            if bound := points_per_s_cores_allow(cpu, r["machine"]["logical_cores"]):
                rows.append(("", "  what the cores allow server + PostgreSQL alone (derived)", f"{bound:.0f}", "", ""))
    if d := r["cases"].get("dedup"):
        rows.append(("5 dedup", f"{d['checkpoints']} ckpts: uploaded / folder MB",
                     f"{d['uploaded_bytes'] / MB:.1f}", f"{d['folder_bytes'] / MB:.1f}", rx(d["uploaded_fraction"])))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mc = r["machine"]
    head = (f"{mc['logical_cores']} cores ({mc['cpu_model']}), {mc['ram_gib']} GiB RAM, Python {mc['python']}, "
            f"MLflow {mc['versions'].get('mlflow')}, torch {mc['versions'].get('torch')}; load average "
            f"{mc['load_before']} before, {mc['load_after']} after; medians (min-max) of {r['repeat']}")
    return head + "\n" + "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: checks that every case runs")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--repeat", type=int, help="repetitions of each case (default 3; smoke 1)")
    p.add_argument("--transfer-mb", type=int, help="checkpoint size for the transfer case, MB (default 1000; smoke 20)")
    p.add_argument("--train-model", help="tiny (128 hidden, 4 layers; default), tiny32 (smoke), minilm "
                                         "or large (BERT-large's shape, 4 GB checkpoints: for --device cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the training case trains (cuda: bf16 mixed precision, see bench/gpu_case.sh)")
    p.add_argument("--train-steps", type=int, help="training steps (default 400; smoke 4)")
    p.add_argument("--drop-stored", action="store_true",
                   help="delete a tracked training run's stored checkpoints once counted (a GPU machine's disk "
                        "holds a few runs of 4 GB checkpoints, not a whole case)")
    p.add_argument("--train-modes", help=f"comma-separated modes of the training case, from {','.join(TRAIN_MODES)} "
                   "(default: none,stock,ours, and boto3 where an S3 server is known); none is always run")
    p.add_argument("--save-every", type=int, help="save every N steps (default 100; smoke 2)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of the training case (default 1: the other core stays free for uploads "
                        "and the stack, as a GPU trainer's host cores are; use all cores for the CPU-bound worst case)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--resume-model", help="minilm (default when .models/ has it) or tiny")
    p.add_argument("--metric-steps", type=int, help="trainer-side log_metrics calls (default 2000; smoke 50)")
    p.add_argument("--metric-clients", type=int, help="concurrent log_batch clients (default 8; smoke 2)")
    p.add_argument("--metric-requests", type=int, help="log_batch requests per client (default 100; smoke 5)")
    p.add_argument("--dedup-saves", type=int, help="checkpoints in the dedup case (default 10; smoke 3)")
    p.add_argument("--tracking-uri", help="use this running stack instead of starting one")
    p.add_argument("--mlflow-pid", type=int, help="with --tracking-uri: the MLflow server's pid (memory figure)")
    p.add_argument("--output", type=Path, help="results JSON (default bench/results/bench-<timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    smoke = a.smoke
    defaults = dict(repeat=(1, 3), transfer_mb=(20, 1000), train_model=("tiny32", "tiny"), train_steps=(4, 400),
                    save_every=(2, 100), metric_steps=(50, 2000), metric_requests=(5, 100), metric_clients=(2, 8), dedup_saves=(3, 10),
                    resume_model=("tiny32", "minilm" if MINILM.is_dir() else "tiny"))
    for k, (small, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, small if smoke else full)
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if a.train_modes is not None:
        modes = [m.strip() for m in a.train_modes.split(",") if m.strip()]
        if bad := [m for m in modes if m not in TRAIN_MODES]:
            p.error(f"unknown training mode(s) {bad}; choose from {TRAIN_MODES}")
        a.train_modes = ["none", *dict.fromkeys(m for m in modes if m != "none")]  # the ratios' baseline
    if bad := [c for c in a.cases if c not in CASES]:
        p.error(f"unknown case(s) {bad}; choose from {CASES}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="mlstack-bench-"))
    stack = None
    info = machine()
    import torch
    import transformers

    info["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
    if torch.cuda.is_available():
        info["gpu"] = gpu_description()
    info["load_before"] = [round(x, 2) for x in os.getloadavg()]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": a.smoke, "repeat": a.repeat,
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "cases": {}}
    started = time.perf_counter()
    try:
        if a.tracking_uri:
            mlflow_env = {"MLFLOW_TRACKING_URI": a.tracking_uri,
                          "MLFLOW_TRACKING_USERNAME": os.environ.get("MLFLOW_TRACKING_USERNAME", ""),
                          "MLFLOW_TRACKING_PASSWORD": os.environ.get("MLFLOW_TRACKING_PASSWORD", "")}
            names = ("BENCH_S3_ENDPOINT", "BENCH_S3_KEY", "BENCH_S3_SECRET", "BENCH_S3_BUCKET")
            s3 = {k: os.environ[k] for k in names} if all(os.environ.get(k) for k in names) else None
            service_pids = {"mlflow": a.mlflow_pid} if a.mlflow_pid else {}
            result["stack"] = "external"
        else:
            from mlstack.native.processes import free_port
            from mlstack.native.stack import Stack

            for key in ("db", "s3", "mlflow"):
                os.environ[f"STACK_{key.upper()}_PORT"] = str(free_port())
            stack = Stack(work / "state")
            log("starting a native stack")
            env = stack.up()
            mlflow_env = {"MLFLOW_TRACKING_URI": env["MLFLOW_PUBLIC_URL"],
                          "MLFLOW_TRACKING_USERNAME": env["MLFLOW_TRAINER_USER"],
                          "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_TRAINER_PASSWORD"]}
            creds = json.loads(Path(env["S3_CREDENTIALS_FILE"]).read_text())
            s3 = {"BENCH_S3_ENDPOINT": env["S3_ENDPOINT_URL"], "BENCH_S3_KEY": creds["access_key"],
                  "BENCH_S3_SECRET": creds["secret_key"], "BENCH_S3_BUCKET": env["S3_BUCKET"]}
            service_pids = {name: h.pid for name in ("postgres", "s3", "mlflow") if (h := stack.handle(name))}
            info["mlflow_workers"] = int(env["MLFLOW_WORKERS"])
            result["stack"] = "native (own)"
        b = Bench(a, mlflow_env, s3, work, service_pids)
        for case in a.cases:
            log(f"case {case}")
            t = time.perf_counter()
            result["cases"][case] = globals()[f"case_{case}"](b)
            result["cases"][case]["case_seconds"] = round(time.perf_counter() - t, 1)
    finally:
        if stack is not None:
            stack.down()
        if a.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = info
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    out = a.output or RESULTS / f"bench-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}{'-smoke' if a.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["table"] = table(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + result["table"])
    print(f"\n{result['total_seconds']:.0f} s in all; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
