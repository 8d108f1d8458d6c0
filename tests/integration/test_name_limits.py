"""Names the server or the store cannot hold are refused when the config loads: exit 2, no run.

Before: a run name that sanitizes to nothing (``..``) was refused only after its run was created
(and left RUNNING); one over 250 characters ended in a traceback with SQL text; a checkpoint path
over 255 bytes per component was stored but could never be listed or read back.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from trainer_support import run_cli, step_path, train, train_args, trainer_client, unique_experiment

# name -> (overrides, the key and limit stderr's last line must name)
CASES = {
    "dots_run_name": (["experiment.run_name=.."], ["experiment.run_name", "renders '..', which leaves nothing"]),
    "long_run_name": (["experiment.run_name=" + "r" * 300],
                      ["experiment.run_name", "300 characters long; MLflow's database holds at most 250"]),
    "long_checkpoint_name": (["checkpoints.path_template=" + "c" * 250 + "-{step}"],
                             ["checkpoints.path_template", "the store reads back at most 255 per component"]),
}


@pytest.fixture(scope="module")
def outcomes(native_stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    experiments = {name: unique_experiment(f"names-{name.replace('_', '-')}") for name in CASES}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_cli, native_stack, *train_args(root / name, experiments[name], *overrides),
                                     timeout=240)
                   for name, (overrides, _) in CASES.items()}
        results = {name: f.result() for name, f in futures.items()}
    with trainer_client(native_stack) as client:
        runs = {}
        for name, experiment in experiments.items():
            found = client.get_experiment_by_name(experiment)
            runs[name] = [] if found is None else client.search_runs([found.experiment_id], run_view_type=3)
    return {"results": results, "runs": runs}


@pytest.mark.parametrize("case", sorted(CASES))
def test_name_the_stack_cannot_hold_exits_2_before_any_run(outcomes, case):
    proc = outcomes["results"][case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ")
    for needle in CASES[case][1]:
        assert needle in last, last
    assert "Traceback" not in proc.stderr and "sqlalchemy" not in proc.stderr.lower()
    assert outcomes["runs"][case] == []  # not even a deleted one


def test_run_name_of_250_characters_trains_into_a_directory_that_fits(native_stack, tmp_path):
    """MLflow's longest run name: the run's directory <name>-<run id> is cut to one path component."""
    name = "r" * 250
    done = train(native_stack, tmp_path, unique_experiment("names-250"), f"experiment.run_name={name}",
                 "training.max_steps=4", "checkpoints.save_last_k=null", "checkpoints.save_top_k=null",
                 "checkpoints.monitor=null")
    assert done.name == name and done.step == 4
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.endswith(done.run_id)]
    assert len(run_dir.name) == 255 and (run_dir / "checkpoint-4").is_dir()
    with trainer_client(native_stack) as client:
        assert client.get_run(done.run_id).info.status == "FINISHED"
        assert client.get_run(done.run_id).data.tags["checkpoint.latest"] == step_path(4)
