"""One measurement, in its own process: ``python bench/worker.py KIND JSON_ARGS OUT_JSON``.

bench/bench.py starts one of these per case and repetition, so every case gets a fresh
interpreter (no warm caches, no thread pools left over from the case before). Clients that talk
to MLflow get only the tracking URI and the trainer user's credentials; only the ``boto3-*``
kinds get the bucket-scoped S3 key (through the environment, set by the parent).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stop_tqdm() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")


# -- case 1 and 5: training with and without tracking ----------------------------------------------


CONFIG = REPO / "configs" / "tiny.yaml"


def train_sets(a: dict) -> list[str]:
    """``--set`` overrides of configs/tiny.yaml for a bench training; the resume case passes the same ones."""
    sets = [
        f"model.name_or_path={a['model_dir']}",
        f"model.from_config={'true' if a['from_config'] else 'false'}",
        f"training.max_steps={a['steps']}",
        f"training.save_steps={a['save_every']}",
        f"training.logging_steps={a.get('logging_steps', 5)}",
        "training.eval_strategy=no",
        f"training.per_device_train_batch_size={a['batch_size']}",
        f"data.max_length={a['max_length']}",
        f"data.max_train_samples={a['steps'] * a['batch_size']}",
        "checkpoints.save_top_k=null",
        "checkpoints.save_last_k=null",
        "checkpoints.monitor=null",
        f"experiment.name={a.get('experiment', 'bench-training')}",
        f"output_root={a['work']}/outputs",
    ]
    sets += [f"model.config_overrides.{k}={v}" for k, v in (a.get("config_overrides") or {}).items()]
    if a.get("device") == "cuda":  # configs/tiny.yaml pins the CPU; on a GPU, train as users do there
        sets += ["training.use_cpu=false", "training.bf16=true"]
    return sets


def _train_config(a: dict):
    from mltrainer.config import load_config

    return load_config(str(CONFIG), train_sets(a))


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _boto3_every_save():
    """Each save's files to S3 with boto3 on a background thread, drained at the end of training.

    No MLflow, no manifest, no hashing: what moving the same bytes into the same S3 server costs
    on this host, the floor for any tracker that stores every checkpoint.
    """
    import queue
    import threading

    from transformers import TrainerCallback

    s3, bucket = _s3(), os.environ["BENCH_S3_BUCKET"]
    saves: queue.Queue = queue.Queue()

    def upload() -> None:
        while (folder := saves.get()) is not None:
            for f in _files(folder):
                s3.upload_file(str(f), bucket, f"bench-train/{os.getpid()}/{folder.name}/{f.relative_to(folder)}")
            saves.task_done()

    threading.Thread(target=upload, daemon=True).start()

    class Boto3EverySave(TrainerCallback):
        def on_save(self, args, state, control, **_k):
            saves.put(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_train_end(self, *_a, **_k):
            saves.join()
            saves.put(None)

    return Boto3EverySave()


def _uploads_apart_child(cfg, run_id: str, run_dir: str, jobs, results) -> None:
    """The child process of mode ``apart``: the trainer's own pipeline, fed saves by the parent."""
    _stop_tqdm()
    from mlflow.tracking import MlflowClient

    from mltrainer.pipeline import build_checkpoint_pipeline
    from mltrainer.uploader import UploadJob

    try:
        uploader = build_checkpoint_pipeline(cfg, MlflowClient(), run_id, Path(run_dir)).uploader
        results.put("ready")
        while (job := jobs.get()) is not None:
            snap, local, store_path, step = job
            uploader.submit(UploadJob(Path(snap), Path(local), store_path, step, {}))
        uploader.close(progress=False)
    except BaseException as exc:  # the parent waits on ``results``: it must hear of a failure too
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    results.put(dataclasses.asdict(uploader.stats))


def _uploads_apart(cfg, run_id: str, run_dir: Path):
    """Our uploader in a separate process (a diagnostic, not a product mode): does sharing the
    training process's interpreter slow the steps? The training side keeps what ours does on a
    save (the hard-linked snapshot) and hands the rest to the child through a queue."""
    import multiprocessing

    from transformers import TrainerCallback

    from mltrainer.callback import SNAPSHOT_DIR, snapshot
    from mltrainer.naming import checkpoint_store_path

    ctx = multiprocessing.get_context("spawn")  # no CUDA state, no threads inherited by a fork
    jobs, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_uploads_apart_child, args=(cfg, run_id, str(run_dir), jobs, results), daemon=True)
    child.start()
    if (started := results.get(timeout=300)) != "ready":
        raise RuntimeError(f"the upload process did not start: {started}")

    class UploadsApart(TrainerCallback):
        stats: dict = {}

        def on_save(self, args, state, control, **_k):
            step = state.global_step
            local = Path(args.output_dir) / f"checkpoint-{step}"
            snap = snapshot(local, run_dir / SNAPSHOT_DIR / f"step-{step}")
            store_path = checkpoint_store_path(cfg.checkpoints.path_template, step=step, epoch=state.epoch)
            jobs.put((str(snap), str(local), store_path, step))

        def on_train_end(self, *_a, **_k):
            started = time.perf_counter()
            jobs.put(None)
            self.stats = results.get()
            if "error" in self.stats:
                raise RuntimeError(f"the upload process failed: {self.stats['error']}")
            self.stats["final_wait_s"] = time.perf_counter() - started  # what training waited, IPC included

        def join(self) -> None:
            """After the clock stopped: the child's interpreter shutdown is not what is measured."""
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"the upload process exited with {child.exitcode}")

    return UploadsApart()


def train(a: dict) -> dict:
    """mode none: plain Trainer; stock: transformers' MLflowCallback with artifacts; ours: our
    callback; apart: our uploader in a separate process, no metrics; boto3: every save's files
    uploaded by boto3 on a thread (no tracking at all)."""
    _stop_tqdm()
    mode = a["mode"]
    if mode == "stock":
        os.environ["HF_MLFLOW_LOG_ARTIFACTS"] = "1"
        os.environ["MLFLOW_EXPERIMENT_NAME"] = "bench-training-stock"
    import torch
    from transformers import Trainer

    from mltrainer.modeling import prepare
    from mltrainer.train import build_training_arguments

    torch.set_num_threads(a.get("torch_threads") or torch.get_num_threads())
    cfg = _train_config(a)
    args = build_training_arguments(cfg)
    out_dir = Path(a["work"]) / f"train-{mode}-{os.getpid()}"
    args.output_dir = str(out_dir)
    args.disable_tqdm = True
    if mode == "stock":
        args.report_to = ["mlflow"]
    from transformers import set_seed

    set_seed(args.seed)
    prepared = prepare(cfg)
    callbacks, uploader, client, run_id, apart = [], None, None, None, None
    if mode in ("ours", "apart"):
        from mlflow.tracking import MlflowClient

        from mltrainer import tracking
        from mltrainer.pipeline import build_checkpoint_pipeline

        client = MlflowClient()
        run_id = tracking.create_run(client, cfg, f"bench-{mode}")
        if mode == "ours":
            # The trainer's own wiring (train.py builds it the same way), so the bench measures the product
            pipeline = build_checkpoint_pipeline(cfg, client, run_id, out_dir)
            uploader = pipeline.uploader
            callbacks.append(pipeline.callback)
        else:
            apart = _uploads_apart(cfg, run_id, out_dir)
            callbacks.append(apart)
    if mode == "boto3":
        callbacks.append(_boto3_every_save())
    trainer = Trainer(model=prepared.model, args=args, train_dataset=prepared.train_dataset,
                      data_collator=prepared.data_collator, processing_class=prepared.tokenizer, callbacks=callbacks)
    step_times: list[float] = []

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            self.t = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(StepClock())
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    trainer.train()  # ours: on_train_end drains the upload queue, so every checkpoint is stored
    wall = time.perf_counter() - started
    if apart is not None:
        apart.join()
    result = {"mode": mode, "wall_s": wall, "steps": trainer.state.global_step,
              "cpu_s": round(_cpu_seconds() - cpu_before, 2),
              "median_step_s": statistics.median(step_times) if step_times else None,
              "saves": len([p for p in out_dir.glob("checkpoint-*") if p.is_dir()]),
              "expected_saves": a["steps"] // a["save_every"]}
    if mode in ("ours", "apart"):
        import mlflow

        from mltrainer.store import scan

        mlflow.flush_async_logging()
        complete = [c for c in scan(client, run_id) if c.manifest is not None]
        sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                 for p in out_dir.glob("checkpoint-*") if p.is_dir()]
        stats = dataclasses.asdict(uploader.stats) if uploader else apart.stats  # one shape, the child's too
        result.update(run_id=run_id, manifests=len(complete), final_wait_s=round(stats["final_wait_s"], 3),
                      uploaded_bytes=stats["uploaded_bytes"],
                      deduplicated_bytes=stats["deduplicated_bytes"], folder_bytes=sum(sizes),
                      checkpoint_bytes=max(sizes) if sizes else 0, queue_waits=stats["waits"])
        client.set_terminated(run_id, "FINISHED")
        if a.get("drop_stored"):  # counted above; the next run needs the disk (GBs a run on a GPU)
            from mltrainer.naming import DEFAULT_ROOT
            from mltrainer.transfer import RunArtifacts

            RunArtifacts.of_run(client, run_id).delete_artifacts(DEFAULT_ROOT)
    if mode == "stock":
        import mlflow

        mlflow.end_run()
    if not a.get("keep"):
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# -- case 2: checkpoint transfer --------------------------------------------------------------------


class Timed:
    """Wall seconds and this process's CPU seconds (every thread, user + system) over a block: the
    client's share of a transfer's CPU, next to the server's and S3's that the bench measures."""

    def __enter__(self) -> Timed:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_exc) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


def _proxied_only(a: dict) -> None:
    """MLflow's switches, which RunArtifacts honours too: no presigned S3 URLs, every byte via the server."""
    if a.get("proxied"):
        os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] = "false"
        os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] = "false"


def ours_upload(a: dict) -> dict:
    """The trainer's path: CheckpointUploader (manifest with sha256, dedup index, then files)."""
    _proxied_only(a)
    from mlflow.tracking import MlflowClient

    from mltrainer.callback import snapshot
    from mltrainer.policy import CheckpointPolicy
    from mltrainer.transfer import RunArtifacts
    from mltrainer.uploader import CheckpointUploader, UploadJob

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench-transfer")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench-transfer")
    run = client.create_run(exp_id, run_name="bench-upload")
    store = RunArtifacts.for_artifact_uri(run.info.artifact_uri)
    snap = snapshot(Path(a["src"]), Path(a["work"]) / f"snap-{os.getpid()}")
    with Timed() as timed:
        uploader = CheckpointUploader(store, CheckpointPolicy())
        uploader.submit(UploadJob(snap, Path(a["src"]), "checkpoints/step-1", 1, {}))
        uploader.close(progress=False)
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"seconds": timed.seconds, "client_cpu_s": timed.cpu_s, "run_id": run.info.run_id, "experiment_id": exp_id,
            "artifact_uri": run.info.artifact_uri,
            "uploaded_bytes": uploader.stats.uploaded_bytes}


def ours_download(a: dict) -> dict:
    """The resume path: the manifest from the store, then resume.download_checkpoint (verifies sha256)."""
    _proxied_only(a)
    from mlflow.tracking import MlflowClient

    from mltrainer.resume import download_checkpoint
    from mltrainer.store import scan
    from mltrainer.transfer import RunArtifacts

    _stop_tqdm()
    client = MlflowClient()
    with Timed() as timed:
        store = RunArtifacts.of_run(client, a["run_id"])
        (found,) = [c for c in scan(client, a["run_id"], store=store) if c.manifest is not None]
        dest = Path(a["work"]) / f"dl-ours-{os.getpid()}"
        problem = download_checkpoint(store, found.manifest, dest)
    if problem:
        raise RuntimeError(problem)
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": timed.seconds, "client_cpu_s": timed.cpu_s, "bytes": total}


def _s3():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["BENCH_S3_ENDPOINT"],
                        aws_access_key_id=os.environ["BENCH_S3_KEY"], aws_secret_access_key=os.environ["BENCH_S3_SECRET"],
                        region_name="us-east-1")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def boto3_upload(a: dict) -> dict:
    """boto3 upload_file (default TransferConfig: 8 MB parts, 10 threads) of every file, one after the other."""
    s3, src, bucket = _s3(), Path(a["src"]), os.environ["BENCH_S3_BUCKET"]
    prefix = f"bench-direct/{os.getpid()}"
    with Timed() as timed:
        for f in _files(src):
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(src).as_posix()}")
    return {"seconds": timed.seconds, "client_cpu_s": timed.cpu_s, "prefix": prefix}


def boto3_download(a: dict) -> dict:
    s3, bucket, prefix = _s3(), os.environ["BENCH_S3_BUCKET"], a["prefix"].rstrip("/")
    dest = Path(a["work"]) / f"dl-boto3-{os.getpid()}"
    with Timed() as timed:
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
                for o in page.get("Contents", []) if o["Key"].rsplit("/", 1)[-1] not in a.get("skip", ())]
        for key in keys:
            target = dest / key[len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
    total = sum(f.stat().st_size for f in _files(dest))
    shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": timed.seconds, "client_cpu_s": timed.cpu_s, "bytes": total}


def local_copy(a: dict) -> dict:
    dest = Path(a["work"]) / f"copy-{os.getpid()}"
    started = time.perf_counter()
    shutil.copytree(a["src"], dest)
    os.sync()
    seconds = time.perf_counter() - started
    shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": seconds}


# -- case 4: metric logging -------------------------------------------------------------------------


def metrics_trainer(a: dict) -> dict:
    """How long tracking.log_metrics holds the calling (training) thread, and the rate it sustains."""
    from mlflow.tracking import MlflowClient

    import mlflow
    from mltrainer import tracking

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench-metrics")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench-metrics")
    run_id = client.create_run(exp_id, run_name="bench-trainer-metrics").info.run_id
    keys = [f"m{i}" for i in range(a["metrics_per_step"])]
    calls = []
    started = time.perf_counter()
    for step in range(a["steps"]):
        t = time.perf_counter()
        tracking.log_metrics(client, run_id, {k: step * 0.5 for k in keys}, step)
        calls.append(time.perf_counter() - t)
    enqueued = time.perf_counter() - started
    mlflow.flush_async_logging()
    total = time.perf_counter() - started
    points = a["steps"] * len(keys)
    history = client.get_metric_history(run_id, keys[-1])
    client.set_terminated(run_id, "FINISHED")
    calls.sort()
    return {"points": points, "enqueue_s": enqueued, "total_s": total, "call_p50_ms": 1000 * calls[len(calls) // 2],
            "call_p99_ms": 1000 * calls[int(len(calls) * 0.99)], "stored_steps": len(history)}


KINDS = {f.__name__.replace("_", "-"): f for f in
         (train, ours_upload, ours_download, boto3_upload, boto3_download, local_copy, metrics_trainer)}


def main() -> int:
    kind, args, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.WARNING)
    if not (kind.startswith("boto3") or args.get("mode") == "boto3"):
        leaked = [k for k in os.environ if k.startswith(("AWS_", "S3_", "BENCH_S3"))]
        assert not leaked, f"MLflow clients must not see S3 credentials: {leaked}"
    result = KINDS[kind](args)
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
