"""``mltrainer``: fine-tune from a YAML config, tracked by the stack; list a run's checkpoints.

    mltrainer --config configs/x.yaml [--set training.learning_rate=3e-5 ...]
    mltrainer checkpoints --run-id RUN_ID
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_CONFIG = 2
EXIT_TRACKING = 3
EXIT_UPLOAD = 4


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mltrainer", description="Fine-tune a transformers model, tracked in MLflow.")
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. training.learning_rate=3e-5 (repeatable)")
    args = parser.parse_args(argv)

    from mltrainer.config import load_config
    from mltrainer.errors import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from mltrainer.tracking import TrackingError
    from mltrainer.train import train
    from mltrainer.uploader import UploadError

    try:
        result = train(cfg)
    except ValueError as exc:  # bad TrainingArguments values, dataset columns, labels
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TrackingError as exc:
        print(f"tracking error: {exc}", file=sys.stderr)
        return EXIT_TRACKING
    except UploadError as exc:
        print(f"upload error: {exc}", file=sys.stderr)
        return EXIT_UPLOAD
    if result is not None and int(__import__("os").environ.get("RANK", "0")) == 0:
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
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_TRACKING
    print(format_table(rows) if rows else f"run {args.run_id} has no stored checkpoints")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "httpx", "mlflow.tracking._tracking_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv and argv[0] == "checkpoints":
        return _checkpoints(argv[1:])
    return _train(argv)


if __name__ == "__main__":
    sys.exit(main())
