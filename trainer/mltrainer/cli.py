"""``mltrainer``: fine-tune from a YAML config, tracked by the stack; and its subcommands.

    mltrainer --config configs/x.yaml [--set training.learning_rate=3e-5 ...]
    mltrainer --config configs/x.yaml --resume RUN_ID|latest [--resume-checkpoint STEP|STORE_PATH]
    mltrainer checkpoints --run-id RUN_ID
    mltrainer sweep|cv|best ...   (SUBCOMMAND_SUMMARIES; ``mltrainer --help`` lists them)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from mltrainer.errors import EXIT_DAMAGED, EXIT_MONITOR, EXIT_OK, EXIT_TRACKING, MltrainerError


# MLflow's UI opens in its "GenAI" mode unless told otherwise (a query parameter, then the
# browser remembers); our runs and checkpoint models belong to its "Model training" mode.
UI_MODEL_TRAINING = "?workflowType=machine_learning"
NO_TRACKING_SERVER = (
    "no tracking server: set MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD) to the "
    "stack's; for the native stack: eval \"$(.venv/bin/mlstack env)\""
)


def _require_tracking_server() -> None:
    """Every subcommand talks to the team's server; without one, say so and write nothing.

    Left unset, MLflow falls back to a SQLite file (or ./mlruns) in the working directory: a
    run "not found" there, and a stray mlflow.db left behind.
    """
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if not is_tracking_uri_set():
        print(f"tracking error: {NO_TRACKING_SERVER}", file=sys.stderr)
        raise SystemExit(EXIT_TRACKING)


def _guarded(action: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``action``; our error types become one line and their exit code, not a traceback.

    Only :class:`MltrainerError` (each carries its code and label) and the server's own refusals
    are caught: anything else is a bug and keeps its traceback (errors.py says why).
    """
    from mlflow.exceptions import MlflowException

    from mltrainer import server_errors

    try:
        return action(), None
    except MltrainerError as exc:
        if exc.exit_code == EXIT_OK:  # an outcome, not a failure (a finished run to resume)
            print(exc)
        else:
            print(f"{exc.label}: {exc}", file=sys.stderr)
            _print_notes(exc)
        return None, exc.exit_code
    except MlflowException as exc:  # the server refused a request; its message may hold SQL text
        print(f"tracking error: {server_errors.describe(exc)}", file=sys.stderr)
        _print_notes(exc)
        return None, EXIT_TRACKING


def _print_notes(exc: BaseException) -> None:
    """What was added on the way out, e.g. the checkpoints a failed training left only on local disk."""
    for note in getattr(exc, "__notes__", ()):
        print(note, file=sys.stderr)


# The subcommands, for dispatch and for ``mltrainer --help``: name -> one line on what it does.
SUBCOMMAND_SUMMARIES = {
    "checkpoints": "list a run's stored checkpoints (--verify: check every object behind them)",
    "sweep": "hyperparameter sweep (Optuna or Ray Tune): one parent run, one nested run per trial",
    "cv": "k-fold cross-validation: one parent run, one nested run per fold, mean and std per metric",
    "best": "rank an experiment's runs by a metric; optionally register the best",
}


def _subcommands_epilog() -> str:
    width = max(map(len, SUBCOMMAND_SUMMARIES))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in SUBCOMMAND_SUMMARIES.items()]
    return "\n".join(["subcommands (mltrainer SUBCOMMAND --help for its options):", *lines])


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mltrainer", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] --config CONFIG [--set KEY=VALUE] [--resume RUN_ID|latest] [--resume-checkpoint ...]\n"
              f"       %(prog)s {{{','.join(SUBCOMMAND_SUMMARIES)}}} ...",
        description="Fine-tune a transformers model, tracked in MLflow (the default command).",
        epilog=_subcommands_epilog())
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. training.learning_rate=3e-5 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_ID|latest",
                        help="continue this run (or the newest run of this config) from its last complete checkpoint")
    parser.add_argument("--resume-checkpoint", metavar="STEP|STORE_PATH",
                        help="with --resume: continue from this stored checkpoint instead of the newest")
    args = parser.parse_args(argv)
    _require_tracking_server()
    if args.resume_checkpoint and not args.resume:
        parser.error("--resume-checkpoint needs --resume RUN_ID|latest")

    from mltrainer.config import load_config
    from mltrainer.train import train

    result, code = _guarded(lambda: train(load_config(args.config, args.overrides), resume=args.resume,
                                          resume_checkpoint=args.resume_checkpoint))
    if code is not None:
        return code
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        import mlflow

        from mltrainer.store import format_table, list_checkpoints

        client = mlflow.tracking.MlflowClient()
        run = client.get_run(result.run_id)
        uri = mlflow.get_tracking_uri().rstrip("/")
        print(f"\nRun {run.info.run_name} ({result.run_id}) finished at step {result.global_step}")
        experiment_page = f"{uri}/#/experiments/{run.info.experiment_id}"
        print(f"  UI:          {experiment_page}/runs/{result.run_id}{UI_MODEL_TRAINING}")
        print(f"  Checkpoints: {experiment_page}/models{UI_MODEL_TRAINING}")
        print(f"  Local dir:   {result.run_dir}")
        print(f"  Final model: {result.model_uri or 'not logged (log_final_model: false)'}")
        print(format_table(list_checkpoints(client, result.run_id)))
    if result is not None and result.policy_problem:
        print(f"checkpoint policy error: {result.policy_problem}", file=sys.stderr)
        return EXIT_MONITOR
    return 0


def describe_run_error(run_id: str, exc: Exception) -> str:
    from mltrainer.resume import run_lookup_error

    return run_lookup_error(run_id, exc)


def _checkpoints(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mltrainer checkpoints", description="List a run's stored checkpoints.")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--verify", action="store_true",
                        help="also check that every file of each complete checkpoint is in the store with the size "
                             f"its manifest lists (by listing; contents are not read); exit {EXIT_DAMAGED} if not")
    args = parser.parse_args(argv)
    _require_tracking_server()

    import mlflow
    from mlflow.exceptions import MlflowException

    from mltrainer.store import format_table, list_checkpoints

    try:
        rows = list_checkpoints(mlflow.tracking.MlflowClient(), args.run_id, verify=args.verify)
    except MlflowException as exc:
        print(f"error: {describe_run_error(args.run_id, exc)}", file=sys.stderr)
        return EXIT_TRACKING
    print(format_table(rows, verified=args.verify) if rows else f"run {args.run_id} has no stored checkpoints")
    damaged = [c for c in rows if c.state == "damaged"]
    for c in damaged:
        print(f"damaged checkpoint {c.store_path}: {c.problem}", file=sys.stderr)
    return EXIT_DAMAGED if damaged else 0


def _sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mltrainer sweep",
        description="Hyperparameter sweep (Optuna or Ray Tune): one MLflow parent run, one nested run per trial. "
                    "Re-running the same command continues an interrupted optuna sweep.")
    parser.add_argument("--config", required=True, help="sweep YAML (base: <training config>, search: {...})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the base training config (repeatable)")
    parser.add_argument("--max-trials", type=int, metavar="N",
                        help="run at most N trials in this invocation; run the command again to continue")
    parser.add_argument("--fresh", action="store_true",
                        help="optuna: discard the stored study of this sweep and start a new parent run")
    args = parser.parse_args(argv)
    _require_tracking_server()
    if args.max_trials is not None and args.max_trials < 0:
        parser.error("--max-trials must be >= 0")

    from mltrainer.sweep import format_trials, load_sweep, run_sweep

    def sweep():
        loaded = load_sweep(args.config, args.overrides)
        return loaded, run_sweep(loaded, max_trials=args.max_trials, fresh=args.fresh)

    got, code = _guarded(sweep)
    if code is not None:
        return code
    loaded, outcome = got
    spec = loaded.spec
    print(f"\nSweep {spec.name} ({spec.backend}): parent run {outcome.parent_run_id}")
    print(format_trials(spec, outcome.records, outcome.best))
    done = sum(1 for r in outcome.records)
    if not outcome.complete:
        print(f"{done} of {spec.trials} trials done; run the same command again to continue")
    if outcome.best is not None:
        print(f"Best trial {outcome.best.number} (run {outcome.best.run_id}): {spec.metric}={outcome.best.value:.6g}")
        return 0
    if done == 0 and not outcome.complete:
        return 0
    print("no trial completed", file=sys.stderr)
    return 1


def _cv(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mltrainer cv",
                                     description="k-fold cross-validation over data.files.train: one parent run, "
                                                 "one nested run per fold, mean and std of each metric.")
    parser.add_argument("--config", required=True, help="YAML training config (data.files only)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--metric", dest="metrics", action="append", default=[],
                        help="metric to aggregate (repeatable; default eval_loss)")
    parser.add_argument("--seed", type=int, help="shuffle seed (default: training.seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    args = parser.parse_args(argv)
    _require_tracking_server()

    from mltrainer.cv import load_cv, run_cv

    setup, code = _guarded(lambda: load_cv(args.config, args.overrides, args.folds, args.metrics, args.seed))
    if code is not None:
        return code
    outcome, code = _guarded(lambda: run_cv(setup))
    if code is not None:
        return code
    print(f"\nCross-validation ({setup.folds} folds): parent run {outcome.parent_run_id}")
    for fold in outcome.folds:
        values = "  ".join(f"{m}={fold.metrics[m]:.6g}" for m in setup.metrics)
        print(f"  fold {fold.fold}: run {fold.run_id}  {values}")
    for m in setup.metrics:
        print(f"  {m}: mean {outcome.aggregates[m + '_mean']:.6g}  std {outcome.aggregates[m + '_std']:.6g}")
    return 0


def _best(argv: list[str]) -> int:
    from mltrainer.config import RegisteredModelConfig
    from mltrainer.limits import model_alias_problem

    parser = argparse.ArgumentParser(prog="mltrainer best",
                                     description="Rank an experiment's runs by a metric; optionally register the best.")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--metric", required=True, help="e.g. eval_f1")
    parser.add_argument("--mode", choices=("min", "max"), required=True)
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.x = '1'\"")
    parser.add_argument("--top", type=int, default=5, help="how many runs to show (default 5)")
    parser.add_argument("--all-statuses", action="store_true", help="also consider unfinished and failed runs")
    parser.add_argument("--checkpoints", action="store_true",
                        help="rank the runs' checkpoints (each at its step) instead of the runs' final metrics")
    parser.add_argument("--parent-run", metavar="RUN_ID",
                        help="with --checkpoints: only the checkpoints of this run's children (a sweep's trials)")
    parser.add_argument("--register", metavar="MODEL_NAME", help="register the best run's model under this name")
    parser.add_argument("--alias", default=RegisteredModelConfig.alias,
                        help=f"alias for the registered version (default {RegisteredModelConfig.alias})")
    args = parser.parse_args(argv)
    _require_tracking_server()
    if args.top < 1:
        parser.error("--top must be >= 1")
    if (problem := model_alias_problem(args.alias)) is not None:
        parser.error(f"--alias: {problem}")

    import mlflow

    from mltrainer.best import SelectionError, format_table, rank_runs, register_best
    from mltrainer.tracking import check_server

    client = mlflow.tracking.MlflowClient()
    if args.parent_run and not args.checkpoints:
        parser.error("--parent-run needs --checkpoints")

    def rank_checkpoints_and_register() -> None:
        from mltrainer.best_checkpoint import format_checkpoints, rank_checkpoints, register_checkpoint

        check_server(client)
        ranked = rank_checkpoints(client, args.experiment, args.metric, args.mode, args.top, args.parent_run)
        print(format_checkpoints(ranked, args.metric))
        best = ranked[0]
        print(f"\nBest: checkpoint {best.store_path} of run {best.run_id} {args.metric}={best.value:.6g}")
        if args.register:
            version = register_checkpoint(client, best, args.register, args.alias)
            print(f"Registered runs:/{best.run_id}/{best.store_path} as {args.register} version {version} "
                  f"(@{args.alias})")

    def rank_and_register() -> None:
        check_server(client)
        ranked = rank_runs(client, args.experiment, args.metric, args.mode, args.filter, args.top,
                           args.all_statuses)
        if not ranked.runs:
            raise SelectionError(f"no run of experiment {args.experiment!r} has metric {args.metric!r}"
                                 + (f" and matches filter {args.filter!r}" if args.filter else ""))
        print(format_table(ranked))
        best = ranked.runs[0]
        print(f"\nBest: run {best.info.run_id} ({best.info.run_name}) {args.metric}={best.data.metrics[args.metric]:.6g}")
        if args.register:
            version, uri = register_best(client, best, args.register, args.alias)
            print(f"Registered {uri} as {args.register} version {version} (@{args.alias})")

    _, code = _guarded(rank_checkpoints_and_register if args.checkpoints else rank_and_register)
    return code or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # MLflow's per-download bars are noise next to ours (manifests are tiny).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at" whenever a run ends; we print each run's link once, ourselves.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "httpx", "mlflow.tracking._tracking_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return _train(argv)  # the default command: mltrainer --config x.yaml


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "checkpoints": _checkpoints, "sweep": _sweep, "cv": _cv, "best": _best}


if __name__ == "__main__":
    sys.exit(main())
