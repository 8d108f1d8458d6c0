"""``mltrainer``: fine-tune from a YAML config, tracked by the stack; list a run's checkpoints.

    mltrainer --config configs/x.yaml [--set training.learning_rate=3e-5 ...]
    mltrainer --config configs/x.yaml --resume RUN_ID|latest [--resume-checkpoint STEP|STORE_PATH]
    mltrainer checkpoints --run-id RUN_ID
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_CONFIG = 2
EXIT_TRACKING = 3
EXIT_UPLOAD = 4
EXIT_RESUME = 5


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mltrainer", description="Fine-tune a transformers model, tracked in MLflow.")
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. training.learning_rate=3e-5 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_ID|latest",
                        help="continue this run (or the newest run of this config) from its last complete checkpoint")
    parser.add_argument("--resume-checkpoint", metavar="STEP|STORE_PATH",
                        help="with --resume: continue from this stored checkpoint instead of the newest")
    args = parser.parse_args(argv)
    if args.resume_checkpoint and not args.resume:
        parser.error("--resume-checkpoint needs --resume RUN_ID|latest")

    from mltrainer.config import load_config
    from mltrainer.errors import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from mltrainer.resume import ResumeError
    from mltrainer.tracking import TrackingError
    from mltrainer.train import train
    from mltrainer.uploader import UploadError

    try:
        result = train(cfg, resume=args.resume, resume_checkpoint=args.resume_checkpoint)
    except ValueError as exc:  # bad TrainingArguments values, dataset columns, labels
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TrackingError as exc:
        print(f"tracking error: {exc}", file=sys.stderr)
        return EXIT_TRACKING
    except ResumeError as exc:
        print(f"resume error: {exc}", file=sys.stderr)
        return EXIT_RESUME
    except UploadError as exc:
        print(f"upload error: {exc}", file=sys.stderr)
        return EXIT_UPLOAD
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        import mlflow

        from mltrainer.store import format_table, list_checkpoints

        client = mlflow.tracking.MlflowClient()
        run = client.get_run(result.run_id)
        uri = mlflow.get_tracking_uri().rstrip("/")
        print(f"\nRun {run.info.run_name} ({result.run_id}) finished at step {result.global_step}")
        print(f"  UI:          {uri}/#/experiments/{run.info.experiment_id}/runs/{result.run_id}")
        print(f"  Local dir:   {result.run_dir}")
        print(f"  Final model: {result.model_uri}")
        print(format_table(list_checkpoints(client, result.run_id)))
    return 0


def describe_run_error(run_id: str, exc: Exception) -> str:
    from mltrainer.resume import run_lookup_error

    return run_lookup_error(run_id, exc)


def _checkpoints(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mltrainer checkpoints", description="List a run's stored checkpoints.")
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)

    import mlflow
    from mlflow.exceptions import MlflowException

    from mltrainer.store import format_table, list_checkpoints

    try:
        rows = list_checkpoints(mlflow.tracking.MlflowClient(), args.run_id)
    except MlflowException as exc:
        print(f"error: {describe_run_error(args.run_id, exc)}", file=sys.stderr)
        return EXIT_TRACKING
    print(format_table(rows) if rows else f"run {args.run_id} has no stored checkpoints")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # MLflow's per-download bars are noise next to ours (manifests are tiny).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "httpx", "mlflow.tracking._tracking_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv and argv[0] == "checkpoints":
        return _checkpoints(argv[1:])
    return _train(argv)


if __name__ == "__main__":
    sys.exit(main())
