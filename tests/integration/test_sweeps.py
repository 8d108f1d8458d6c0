"""Sweeps (optuna and Ray Tune), cross-validation and best-run selection against the real stack.

The CLI runs as a subprocess from the repository root with only the tracking URI and the
trainer's credentials in its environment. Trainings are tiny (4 steps) but each trial still logs
a model, so trial counts stay small.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
FAST = ["training.max_steps=4", "training.save_steps=2", "training.eval_steps=2", "training.logging_steps=1",
        "data.max_train_samples=64", "data.max_eval_samples=32"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def cli_env(stack) -> dict[str, str]:
    env = stack.client_env()
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def run_cli(stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mltrainer.cli", *args], cwd=REPO, env=cli_env(stack),
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def write_sweep(path: Path, name: str, space: dict, trials: int, **search) -> Path:
    path.write_text(yaml.safe_dump({
        "name": name, "base": str(TINY), "overrides": FAST,
        "search": {"space": space, "trials": trials, "metric": "eval_loss", "direction": "minimize", **search},
    }, sort_keys=False))
    return path


def sweep_args(sweep: Path, out: Path, experiment: str, *extra: str) -> list[str]:
    return ["sweep", "--config", str(sweep), "--set", f"output_root={out}", "--set", f"experiment.name={experiment}",
            *extra]


def parent_id_from(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("Sweep ") and "parent run " in line:
            return line.rsplit("parent run ", 1)[1].strip()
        if line.startswith("Cross-validation") and "parent run " in line:
            return line.rsplit("parent run ", 1)[1].strip()
    raise AssertionError(f"no parent run in the output:\n{stdout[-3000:]}")


@pytest.fixture(scope="module")
def client(native_stack):
    import os

    os.environ.update({k: v for k, v in native_stack.client_env().items() if k.startswith("MLFLOW_TRACKING_")})
    return MlflowClient(native_stack.uri)


def children(client: MlflowClient, parent_run_id: str):
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def read_png(client: MlflowClient, run_id: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, path, tmp))
        data = local.read_bytes()
        assert data[:8] == PNG_SIGNATURE, f"{path} of run {run_id} is not a PNG"
        try:
            from PIL import Image
        except ImportError:
            return data
        with Image.open(local) as image:
            image.verify()
            assert image.format == "PNG"
        return data


def stored_checkpoints(stack, client: MlflowClient, run_id: str) -> set[str]:
    run = client.get_run(run_id)
    prefix = f"artifacts/{run.info.experiment_id}/{run_id}/artifacts/"
    return {key[len(prefix):-len("/manifest.json")] for key in stack.bucket_keys(prefix + "checkpoints/")
            if key.endswith("/manifest.json")}


# --------------------------------------------------------------------------------------------
# optuna: 3 trials in two sessions (interrupted after one trial, then resumed)


@pytest.fixture(scope="module")
def optuna_sweep(native_stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optuna-sweep")
    experiment, name = unique("sweep"), unique("lr")
    sweep = write_sweep(tmp / "sweep.yaml", name, {
        "training.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
        "training.warmup_steps": {"type": "int", "low": 0, "high": 2},
    }, trials=3, seed=11)
    out = tmp / "out"
    first = ok(run_cli(native_stack, *sweep_args(sweep, out, experiment, "--max-trials", "1")))
    second = ok(run_cli(native_stack, *sweep_args(sweep, out, experiment)))
    return {"experiment": experiment, "name": name, "out": out, "sweep": sweep, "first": first, "second": second,
            "parent": parent_id_from(second.stdout)}


def test_optuna_sweep_has_one_parent_with_a_child_per_trial(optuna_sweep, client, native_stack):
    parent = client.get_run(optuna_sweep["parent"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mltrainer.sweep"] == "true"
    params = parent.data.params
    assert params["search.backend"] == "optuna" and params["search.algorithm"] == "TPE"
    assert params["search.trials"] == "3" and params["search.metric"] == "eval_loss"
    assert params["search.direction"] == "minimize"
    assert set(json.loads(params["search.space"])) == {"training.learning_rate", "training.warmup_steps"}

    kids = children(client, parent.info.run_id)
    assert len(kids) == 3
    assert sorted(int(k.data.tags["mltrainer.trial"]) for k in kids) == [0, 1, 2]
    checkpoint_sets = {}
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert kid.info.experiment_id == parent.info.experiment_id
        p = kid.data.params
        # the chosen values, logged as trial.<key>, are the values the run trained with
        assert math.isclose(float(p["trial.training.learning_rate"]), float(p["config.training.learning_rate"]))
        assert p["trial.training.warmup_steps"] == p["config.training.warmup_steps"]
        stored = stored_checkpoints(native_stack, client, kid.info.run_id)
        assert stored, f"trial run {kid.info.run_id} has no stored checkpoints"
        checkpoint_sets[kid.info.run_id] = stored
    assert len({kid.info.run_name for kid in kids}) == 3  # trial runs are told apart by name too

    best = min(kids, key=lambda k: k.data.metrics["eval_loss"])
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id
    assert math.isclose(parent.data.metrics["best_eval_loss"], best.data.metrics["eval_loss"], rel_tol=1e-9)
    assert params["best.training.learning_rate"] == best.data.params["trial.training.learning_rate"]
    assert params["best.training.warmup_steps"] == best.data.params["trial.training.warmup_steps"]
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "trial_eval_loss")}
    assert history == {int(k.data.tags["mltrainer.trial"]): pytest.approx(k.data.metrics["eval_loss"]) for k in kids}


def test_interrupted_sweep_resumes_without_repeating_trials(optuna_sweep, client, native_stack):
    first, second = optuna_sweep["first"], optuna_sweep["second"]
    assert parent_id_from(first.stdout) == optuna_sweep["parent"], "the resumed sweep must continue the same parent"
    assert "1 of 3 trials done" in first.stdout
    assert "0 of 3 trials done, running 3" not in second.stderr
    assert "1 of 3 trials done, running 2 now" in second.stderr

    import optuna

    db = optuna_sweep["out"] / "sweeps" / f"{optuna_sweep['name']}.db"
    assert db.is_file()
    study = optuna.load_study(study_name=optuna_sweep["name"], storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.user_attrs["mlflow_parent_run_id"] == optuna_sweep["parent"]
    runs = {t.number: t.user_attrs["run_id"] for t in study.trials}
    kids = children(client, optuna_sweep["parent"])
    assert {k.info.run_id: int(k.data.tags["mltrainer.trial"]) for k in kids} == {v: n for n, v in runs.items()}

    # running the finished sweep again runs nothing
    again = ok(run_cli(native_stack, *sweep_args(optuna_sweep["sweep"], optuna_sweep["out"],
                                                 optuna_sweep["experiment"])))
    assert parent_id_from(again.stdout) == optuna_sweep["parent"]
    assert len(children(client, optuna_sweep["parent"])) == 3


def test_sweep_and_trial_plots_are_pngs(optuna_sweep, client):
    parent = optuna_sweep["parent"]
    read_png(client, parent, "plots/metric_by_trial.png")
    read_png(client, parent, "plots/param_importance.png")
    for kid in children(client, parent):
        read_png(client, kid.info.run_id, "plots/curves.png")
        read_png(client, kid.info.run_id, "plots/confusion_matrix.png")


# --------------------------------------------------------------------------------------------
# a failing trial


def test_failed_trial_is_marked_and_the_sweep_goes_on(native_stack, client, tmp_path):
    experiment, name = unique("sweep-fail"), unique("bs")
    # grid: both choices are tried; batch size 0 passes config validation but fails inside training
    sweep = write_sweep(tmp_path / "sweep.yaml", name, {
        "training.per_device_train_batch_size": {"type": "categorical", "choices": [8, 0]},
    }, trials=2, algorithm="grid", seed=1)
    proc = ok(run_cli(native_stack, *sweep_args(sweep, tmp_path / "out", experiment)))
    parent = client.get_run(parent_id_from(proc.stdout))
    kids = children(client, parent.info.run_id)
    by_batch = {k.data.params["trial.training.per_device_train_batch_size"]: k for k in kids}
    assert set(by_batch) == {"8", "0"}
    assert by_batch["0"].info.status == "FAILED"
    assert by_batch["8"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_run_id"] == by_batch["8"].info.run_id
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_complete"] == 1

    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'sweeps' / (name + '.db')}")
    states = {t.params["training.per_device_train_batch_size"]: t.state.name for t in study.trials}
    assert states == {8: "COMPLETE", 0: "FAIL"}


def test_invalid_sweep_key_is_reported_before_any_run(native_stack, tmp_path):
    sweep = write_sweep(tmp_path / "sweep.yaml", "bad", {
        "training.learnin_rate": {"type": "float", "low": 1e-4, "high": 1e-3},
    }, trials=1)
    proc = run_cli(native_stack, *sweep_args(sweep, tmp_path / "out", unique("bad")), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "search.space.training.learnin_rate" in proc.stderr and "learning_rate" in proc.stderr


# --------------------------------------------------------------------------------------------
# Ray Tune


def test_ray_sweep_has_the_same_structure(native_stack, client, tmp_path):
    experiment, name = unique("sweep-ray"), unique("ray")
    sweep = write_sweep(tmp_path / "sweep.yaml", name, {
        "training.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
    }, trials=2, backend="ray", algorithm="random", seed=5, parallel=1)
    proc = ok(run_cli(native_stack, *sweep_args(sweep, tmp_path / "out", experiment)))
    parent = client.get_run(parent_id_from(proc.stdout))
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mltrainer.sweep"] == "true" and parent.data.params["search.backend"] == "ray"
    kids = children(client, parent.info.run_id)
    assert len(kids) == 2
    assert sorted(int(k.data.tags["mltrainer.trial"]) for k in kids) == [0, 1]
    assert all(k.info.status == "FINISHED" for k in kids)
    best = min(kids, key=lambda k: k.data.metrics["eval_loss"])
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id
    assert math.isclose(parent.data.metrics["best_eval_loss"], best.data.metrics["eval_loss"], rel_tol=1e-9)
    read_png(client, parent.info.run_id, "plots/metric_by_trial.png")
    read_png(client, parent.info.run_id, "plots/param_importance.png")


# --------------------------------------------------------------------------------------------
# cross-validation


def test_two_fold_cross_validation(native_stack, client, tmp_path):
    experiment = unique("cv")
    args = ["cv", "--config", str(TINY), "--folds", "2", "--metric", "eval_loss", "--metric", "eval_runtime",
            "--set", f"output_root={tmp_path / 'out'}", "--set", f"experiment.name={experiment}"]
    for o in FAST:
        args += ["--set", o]
    proc = ok(run_cli(native_stack, *args))
    parent = client.get_run(parent_id_from(proc.stdout))
    assert parent.info.status == "FINISHED" and parent.data.tags["mltrainer.cv"] == "true"
    assert parent.data.params["cv.folds"] == "2"
    kids = children(client, parent.info.run_id)
    assert sorted(k.data.tags["mltrainer.fold"] for k in kids) == ["0", "1"]
    assert all(k.info.status == "FINISHED" for k in kids)
    for metric in ("eval_loss", "eval_runtime"):
        values = [k.data.metrics[metric] for k in kids]
        mean = sum(values) / 2
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        assert parent.data.metrics[f"{metric}_mean"] == pytest.approx(mean, rel=1e-9)
        assert parent.data.metrics[f"{metric}_std"] == pytest.approx(std, rel=1e-9, abs=1e-12)
    # the folds trained on different data: their eval files are different halves of the train file
    evals = {k.data.params["config.data.files.eval"] for k in kids}
    assert len(evals) == 2
    for kid in kids:
        read_png(client, kid.info.run_id, "plots/curves.png")


def test_cv_refuses_hub_data(native_stack, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"] = {"hub": {"name": "org/dataset", "split_eval": "test"}, "max_length": 32}
    cfg["model"]["name_or_path"] = str(REPO / "configs" / "models" / "tiny-bert")
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli(native_stack, "cv", "--config", str(path), "--folds", "2", timeout=120)
    assert proc.returncode == 2
    assert "data.hub" in proc.stderr and "data.files.train" in proc.stderr


# --------------------------------------------------------------------------------------------
# best


@pytest.fixture(scope="module")
def known_runs(client):
    experiment = unique("best")
    exp_id = client.create_experiment(experiment)
    runs = {}
    for name, f1, x in (("a", 0.5, "1"), ("b", 0.9, "2"), ("c", 0.7, "1"), ("d", 0.6, "3")):
        run = client.create_run(exp_id, run_name=f"run-{name}")
        client.log_param(run.info.run_id, "x", x)
        client.log_param(run.info.run_id, "constant", "same")
        client.log_metric(run.info.run_id, "eval_f1", f1)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[name] = run.info.run_id
    return experiment, runs


def best_line_run(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("Best: run "))
    return line.split()[2]


def test_best_ranks_by_metric_and_honours_the_filter(native_stack, known_runs):
    experiment, runs = known_runs
    proc = ok(run_cli(native_stack, "best", "--experiment", experiment, "--metric", "eval_f1", "--mode", "max",
                      "--top", "3", timeout=120))
    assert best_line_run(proc.stdout) == runs["b"]
    table = proc.stdout.split("\n\nBest:")[0].splitlines()
    assert table[0].split()[:4] == ["rank", "run", "id", "run"] and "x" in table[0].split()
    assert "constant" not in table[0]  # only params that differ
    assert [row.split()[1] for row in table[1:]] == [runs["b"], runs["c"], runs["d"]]

    low = ok(run_cli(native_stack, "best", "--experiment", experiment, "--metric", "eval_f1", "--mode", "min",
                     timeout=120))
    assert best_line_run(low.stdout) == runs["a"]

    filtered = ok(run_cli(native_stack, "best", "--experiment", experiment, "--metric", "eval_f1", "--mode", "max",
                          "--filter", "params.x = '1'", timeout=120))
    assert best_line_run(filtered.stdout) == runs["c"]
    assert runs["b"] not in filtered.stdout


def test_best_reports_a_bad_filter_and_an_unknown_experiment(native_stack, known_runs):
    experiment, _ = known_runs
    bad = "params.x === '1'"
    proc = run_cli(native_stack, "best", "--experiment", experiment, "--metric", "eval_f1", "--mode", "max",
                   "--filter", bad, timeout=120)
    assert proc.returncode == 2
    assert "invalid filter" in proc.stderr and bad in proc.stderr

    missing = unique("no-such-experiment")
    proc = run_cli(native_stack, "best", "--experiment", missing, "--metric", "eval_f1", "--mode", "max", timeout=120)
    assert proc.returncode == 2
    assert missing in proc.stderr and "does not exist" in proc.stderr


def test_best_registers_the_winning_model_under_an_alias(native_stack, client, optuna_sweep):
    parent = optuna_sweep["parent"]
    model_name = unique("sweep-best")
    proc = ok(run_cli(native_stack, "best", "--experiment", optuna_sweep["experiment"], "--metric", "eval_loss",
                      "--mode", "min", "--filter", f"tags.`mlflow.parentRunId` = '{parent}'",
                      "--register", model_name, "--alias", "champion", timeout=180))
    winner = client.get_run(parent).data.tags["best_trial_run_id"]
    assert best_line_run(proc.stdout) == winner
    assert f"as {model_name} version 1 (@champion)" in proc.stdout
    version = client.get_model_version_by_alias(model_name, "champion")
    assert version.version == "1"
    assert version.run_id == winner
