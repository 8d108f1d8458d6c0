"""What a trained run shows in MLflow beyond its metrics and checkpoints: its user, its plots, its
data as dataset inputs, system metrics, and the final model at its step with its metrics.

Two tiny trainings of one config into one experiment, shared by every test here:

* ``straight``: system metrics on (the default), the final model logged, and the training loss
  logged every 3 steps, so its last value (step 18) is not at the last step (20);
* ``resumed``: ``tracking.system_metrics=false``; it fails after its second save and is resumed
  to the end, so what it shows was logged by a resumed run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_support import (REPO, RUN_LINE, artifact_prefix, read_object, run_cli, train, train_args,
                             trainer_client, trainer_env, unique_experiment)

DRIVER = Path(__file__).with_name("fail_after_saves.py")
LAST_STEP = 20  # configs/tiny.yaml: max_steps
LOSS_STEPS = [3, 6, 9, 12, 15, 18]  # the straight run's training loss
PNG = b"\x89PNG\r\n\x1a\n"
SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                  "system/system_memory_usage_percentage")


@pytest.fixture(scope="module")
def client(native_stack):
    with trainer_client(native_stack) as c:
        yield c


@pytest.fixture(scope="module")
def runs(native_stack, client, tmp_path_factory):
    experiment = unique_experiment("run-metadata")
    straight = train(native_stack, tmp_path_factory.mktemp("straight"), experiment, "log_final_model=true",
                     "training.logging_steps=3")

    off = "tracking.system_metrics=false"
    args = train_args(tmp_path_factory.mktemp("resumed"), experiment, off)
    failed = subprocess.run([sys.executable, str(DRIVER), "2", "error", *args], cwd=REPO,
                            env=trainer_env(native_stack), capture_output=True, text=True, timeout=400)
    assert failed.returncode != 0 and "injected failure after save 2" in failed.stderr, failed.stderr[-3000:]
    exp = client.get_experiment_by_name(experiment)
    (crashed,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id != straight.run_id]
    assert crashed.info.status == "FAILED"
    resumed = run_cli(native_stack, *args, "--resume", crashed.info.run_id)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    match = RUN_LINE.search(resumed.stdout)
    assert match and match["run_id"] == crashed.info.run_id and int(match["step"]) == LAST_STEP, resumed.stdout
    return {"straight": client.get_run(straight.run_id), "resumed": client.get_run(crashed.info.run_id)}


def test_run_user_is_the_authenticated_mlflow_user(native_stack, runs):
    user, _ = native_stack.trainer_auth
    for run in runs.values():
        # The UI's "Created by" shows the mlflow.user tag, else the run's user_id.
        assert run.data.tags.get("mlflow.user") == user
        assert run.info.user_id == user


@pytest.mark.parametrize("which", ["straight", "resumed"])
def test_every_run_gets_its_loss_curves_and_confusion_matrix(native_stack, client, runs, which):
    prefix = artifact_prefix(client, runs[which].info.run_id)
    for name in ("plots/curves.png", "plots/confusion_matrix.png"):
        assert read_object(native_stack, prefix + name).startswith(PNG), name


def test_train_and_eval_data_are_dataset_inputs_with_a_stable_digest(runs):
    by_run = {}
    for which, run in runs.items():
        inputs = {}
        for dataset_input in run.inputs.dataset_inputs:
            (context,) = [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"]
            inputs[context] = dataset_input.dataset
        assert set(inputs) == {"training", "eval"}, which
        for context, filename in (("training", "sentiment-train.csv"), ("eval", "sentiment-eval.csv")):
            dataset = inputs[context]
            assert dataset.name == filename
            assert dataset.source_type == "local"
            assert json.loads(dataset.source) == {"uri": str(REPO / "configs" / "data" / filename)}
            columns = {c["name"]: c["type"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
            assert columns == {"text": "string", "label": "long"}
            assert json.loads(dataset.profile)["num_rows"] == (128 if context == "training" else 32)
            assert len(dataset.digest) == 16
        by_run[which] = {context: d.digest for context, d in inputs.items()}
    # The same data, read again by another run (and process): the same digests; train differs from eval.
    assert by_run["straight"] == by_run["resumed"]
    assert by_run["straight"]["training"] != by_run["straight"]["eval"]


def test_system_metrics_are_logged_by_default_and_not_when_switched_off(runs):
    logged = runs["straight"].data.metrics
    for key in SYSTEM_METRICS:
        assert key in logged, sorted(logged)
    assert 0 <= logged["system/cpu_utilization_percentage"] <= 100 * 64
    assert not [k for k in runs["resumed"].data.metrics if k.startswith("system/")]


def test_final_model_is_logged_at_the_last_step_with_the_final_metrics(client, runs):
    run = runs["straight"]
    (model,) = [m for m in client.search_logged_models([run.info.experiment_id],
                                                       filter_string=f"source_run_id = '{run.info.run_id}'")
                if m.model_type != "checkpoint"]  # each kept checkpoint is a model of the run too
    # The run's "Logged models" table shows the step of the run's model output.
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, LAST_STEP)]
    linked = {m.key: m for m in model.metrics}
    final = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}
    assert {k: m.value for k, m in linked.items()} == final
    assert {"loss", "eval_loss", "train_loss"} <= set(linked)
    # The last training loss, though logged before the last step, is the model's loss too.
    assert linked["loss"].step == LOSS_STEPS[-1] and linked["eval_loss"].step == LAST_STEP
    # Linking kept the run's history as it was: one point per logging step.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == LOSS_STEPS
