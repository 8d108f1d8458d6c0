"""Bad input fails before any MLflow run exists: exit 2 for config errors, 3 for tracking errors.

The CLI runs as a subprocess against the session's stack; the cases run concurrently (each is
mostly Python start-up time).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from mlstack.native.processes import free_port

from trainer_support import TINY, run_cli, trainer_client, trainer_env, unique_experiment

EXPERIMENT = unique_experiment("trainer-errors")

# name -> (extra overrides, exit code, strings stderr must contain)
CONFIG_CASES = {
    "unknown_key": (["training.learnin_rate=1"], ["training.learnin_rate", "did you mean learning_rate"]),
    "wrong_type": (["checkpoints.save_top_k=two"], ["checkpoints.save_top_k", "expected an integer"]),
    "missing_data_file": (["data.files.train=configs/data/no-such-file.csv"],
                          ["data.files.train", "no-such-file.csv"]),
    "unknown_task": (["model.task=translation"], ["model.task", "translation"]),
    "bad_training_argument": (["training.lr_scheduler_type=bogus"], ["training", "bogus"]),
}


def all_run_ids(client) -> set[str]:
    ids = set()
    for exp in client.search_experiments(max_results=1000):
        ids |= {r.info.run_id for r in client.search_runs([exp.experiment_id], max_results=10000)}
    return ids


@pytest.fixture(scope="module")
def outcomes(native_stack, tmp_path_factory):
    """Every case's CompletedProcess, plus the run ids that existed before and after them all."""
    root = tmp_path_factory.mktemp("errors")
    base = ["--config", TINY, "--set", f"output_root={root}", "--set", f"experiment.name={EXPERIMENT}"]
    dead_uri = f"http://127.0.0.1:{free_port()}"
    user, _ = native_stack.trainer_auth
    cases = {name: (base + [a for o in overrides for a in ("--set", o)], None)
             for name, (overrides, _) in CONFIG_CASES.items()}
    cases["unreachable"] = (base, trainer_env(native_stack, MLFLOW_TRACKING_URI=dead_uri))
    cases["wrong_password"] = (base, trainer_env(native_stack, MLFLOW_TRACKING_PASSWORD="not-the-password"))
    with trainer_client(native_stack) as client:
        before = all_run_ids(client)
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(run_cli, native_stack, *args, env=env, timeout=240)
                       for name, (args, env) in cases.items()}
            results = {name: f.result() for name, f in futures.items()}
        after = all_run_ids(client)
        experiment = client.get_experiment_by_name(EXPERIMENT)
    return {"results": results, "before": before, "after": after, "experiment": experiment,
            "dead_uri": dead_uri, "root": root}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_exit_2_naming_the_key(outcomes, case):
    proc = outcomes["results"][case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ")
    for needle in CONFIG_CASES[case][1]:
        assert needle in last, last
    assert "Traceback" not in proc.stderr


def test_unreachable_server_exits_3_naming_the_uri(outcomes):
    proc = outcomes["results"]["unreachable"]
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tracking error: the MLflow server at {outcomes['dead_uri']} is unreachable")
    assert "Traceback" not in proc.stderr


def test_wrong_password_exits_3_mentioning_credentials(outcomes, native_stack):
    proc = outcomes["results"]["wrong_password"]
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"tracking error: the MLflow server at {native_stack.uri} rejected the credentials "
                    "(MLFLOW_TRACKING_USERNAME/PASSWORD)")
    assert "not-the-password" not in proc.stderr + proc.stdout


def test_no_run_no_experiment_no_local_dir_left_behind(outcomes):
    assert outcomes["after"] == outcomes["before"]
    assert outcomes["experiment"] is None
    assert not [p for p in outcomes["root"].iterdir() if not p.name.startswith(".")]
