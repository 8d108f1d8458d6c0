"""What ``--resume`` must refuse or leave alone, and races between trainers (real stack, tiny model).

- a run another live process trains is never resumed, by id or as ``latest``; the refusal names
  the holder; once that trainer is dead (its lease expired), the run resumes;
- two resumers of one crashed run: exactly one trains;
- ``--resume latest`` matches the run name exactly (``_`` and ``%`` are not wildcards);
- a FINISHED run is left as it is; a run that crashed after its last step finishes without training;
- trainers creating one new experiment at the same moment all get it.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.exceptions import MlflowException
from trainer_support import (REPO, cli_command, kill_tree_of, metric_steps, object_digests, run_cli, start_train,
                             stored_checkpoints, train, train_args, trainer_client, trainer_env, unique_experiment,
                             wait_for, wait_until_resumable)

from mltrainer import server_errors, tracking
from mltrainer.lease import LEASE_TAG, Lease, LeaseKeeper, RunInUseError

# Short saves, no retention by metric: checkpoints at 4 and 8.
SMALL = ("training.max_steps=8", "training.save_steps=4", "training.eval_steps=4", "training.logging_steps=2",
         "checkpoints.save_last_k=null", "checkpoints.save_top_k=null", "checkpoints.monitor=null")


def crash(client, run_id: str) -> None:
    """As if the run's trainer had died after its last checkpoint: not FINISHED, lease expired."""
    client.set_terminated(run_id, "FAILED")
    client.delete_tag(run_id, LEASE_TAG)


def run_state(stack, client, run_id: str) -> dict:
    """Everything a resume could change: status, tags, every metric's history, every stored object."""
    run = client.get_run(run_id)
    prefix = f"artifacts/{run.info.experiment_id}/{run_id}/"
    return {
        "status": run.info.status, "end_time": run.info.end_time, "tags": run.data.tags,
        "metrics": {key: metric_steps(client, run_id, key) for key in run.data.metrics},
        "objects": object_digests(stack, prefix),
    }


def resume_cli(stack, output_root, experiment: str, ref: str, *overrides: str, timeout: float = 400):
    return run_cli(stack, *train_args(output_root, experiment, *overrides), "--resume", ref, timeout=timeout)


def test_live_run_is_refused_naming_its_holder_and_resumes_once_its_trainer_is_dead(native_stack, tmp_path):
    experiment = unique_experiment("guard-live")
    # Long enough to be mid-training whatever the machine; the lease is shortened so the test
    # does not wait the default minute once the trainer is killed.
    live = ("training.max_steps=100000", "training.save_steps=20", "training.eval_steps=20",
            "training.logging_steps=5", "checkpoints.save_last_k=2", "checkpoints.save_top_k=null",
            "checkpoints.monitor=null", "tracking.lease_seconds=20")
    first = start_train(native_stack, tmp_path / "a", experiment, *live)
    with trainer_client(native_stack) as client:
        try:
            wait_for(lambda: " trains in " in first.logs[1].read_text() or first.poll() is not None,
                     timeout=240, what="the first trainer to start")
            assert first.poll() is None, first.logs[1].read_text()[-3000:]
            run_id = first.logs[1].read_text().split(" trains in ")[0].rsplit("run ", 1)[1].split()[0]
            prefix = f"artifacts/{client.get_run(run_id).info.experiment_id}/{run_id}/artifacts/"
            wait_for(lambda: stored_checkpoints(native_stack, prefix) or first.poll() is not None,
                     timeout=240, what="a first checkpoint in the store")
            assert first.poll() is None, first.logs[1].read_text()[-3000:]
            held = Lease.from_tag(client.get_run(run_id).data.tags[LEASE_TAG])

            for ref in ("latest", run_id):
                refused = resume_cli(native_stack, tmp_path / f"b-{ref}", experiment, ref, *live)
                assert refused.returncode == 5, refused.stdout[-2000:] + refused.stderr[-3000:]
                assert f"resume error: run {run_id} is being trained by another process: host {held.host}, " \
                       f"pid {first.pid} (lease renewed" in refused.stderr
                assert "if that trainer is dead, its lease expires at" in refused.stderr
                assert not list((tmp_path / f"b-{ref}").glob("*/checkpoint-*"))
            assert first.poll() is None  # the refused resumers did not disturb it
            assert Lease.from_tag(client.get_run(run_id).data.tags[LEASE_TAG]).owner == held.owner
        finally:
            if first.poll() is None:
                kill_tree_of(first)
        assert first.returncode == -signal.SIGKILL

        # Killed: its run stays RUNNING, and is resumable once its lease has run out.
        assert client.get_run(run_id).info.status == "RUNNING"
        wait_until_resumable(client, run_id, timeout=60)
        last = max(m["step"] for m in stored_checkpoints(native_stack, prefix).values())
        done = resume_cli(native_stack, tmp_path / "c", experiment, run_id, *live,
                          f"training.max_steps={last + 5}")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"finished at step {last + 5}" in done.stdout
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = [s for s, _ in metric_steps(client, run_id, "loss")]
        assert len(steps) == len(set(steps)), "a metric step was logged twice"
        # The killed trainer may have logged steps past its last stored checkpoint; those stay.
        assert last + 5 in steps and max(steps) >= last + 5


def test_two_resumers_of_one_crashed_run_only_one_trains(native_stack, tmp_path):
    experiment = unique_experiment("guard-race")
    run = train(native_stack, tmp_path / "a", experiment, *SMALL)
    with trainer_client(native_stack) as client:
        crash(client, run.run_id)
        env = trainer_env(native_stack)
        # Started together: both load, reach the lease at about the same time, and race for it.
        procs = [subprocess.Popen(cli_command(*train_args(tmp_path / f"b{i}", experiment, *SMALL, "training.max_steps=16"),
                                              "--resume", run.run_id),
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outputs = [p.communicate(timeout=400) for p in procs]
        codes = sorted(p.returncode for p in procs)
        detail = "\n".join(out[-1500:] + err[-2500:] for out, err in outputs)
        assert codes == [0, 5], detail
        loser = next(err for (out, err), p in zip(outputs, procs) if p.returncode == 5)
        assert ("is being trained by another process" in loser
                or "was claimed by another process at the same moment" in loser), loser[-2000:]
        steps = [s for s, _ in metric_steps(client, run.run_id, "loss")]
        assert steps == list(range(2, 17, 2)), "each step logged exactly once"
        assert client.get_run(run.run_id).info.status == "FINISHED"


def test_lease_claims_racing_on_the_real_server_have_one_winner(native_stack, tmp_path):
    """Many rounds of four claimers released by a barrier at the same instant: one wins each round."""
    with trainer_client(native_stack) as client:
        experiment_id = tracking.get_or_create_experiment(client, unique_experiment("guard-claims"))
        for _round in range(8):
            run_id = client.create_run(experiment_id).info.run_id
            barrier = threading.Barrier(4)

            def claim():
                keeper = LeaseKeeper(client, 30)
                barrier.wait()
                try:
                    keeper.claim(run_id)
                    return keeper.owner
                except RunInUseError:
                    return None

            with ThreadPoolExecutor(4) as pool:
                owners = list(pool.map(lambda _: claim(), range(4)))
            winners = [o for o in owners if o]
            assert len(winners) == 1, owners
            assert Lease.from_tag(client.get_run(run_id).data.tags[LEASE_TAG]).owner == winners[0]


def test_latest_matches_the_run_name_exactly(native_stack, tmp_path):
    experiment = unique_experiment("guard-names")
    name = "a_b%c"  # both LIKE wildcards
    run = train(native_stack, tmp_path / "a", experiment, *SMALL, f"experiment.run_name={name}")
    with trainer_client(native_stack) as client:
        crash(client, run.run_id)
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        logged = client.get_run(run.run_id).data.tags
        tags = {key: logged[key] for key in (tracking.TAG_MODEL, tracking.TAG_TASK)}  # resumable as far as tags go
        # Newer runs whose names match 'a_b%c' as a LIKE pattern, crashed too (RUNNING, no lease).
        decoys = [client.create_run(exp_id, run_name=decoy, tags=tags).info.run_id
                  for decoy in ("aXbc", "a_bYYYc", "a-b%c")]
        done = resume_cli(native_stack, tmp_path / "b", experiment, "latest", *SMALL, f"experiment.run_name={name}")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"Run {name} ({run.run_id}) finished" in done.stdout
        for decoy in decoys:
            assert client.get_run(decoy).info.status == "RUNNING"
            assert LEASE_TAG not in client.get_run(decoy).data.tags

        other = resume_cli(native_stack, tmp_path / "c", experiment, "latest", *SMALL, "experiment.run_name=a_b")
        assert other.returncode == 5, other.stdout[-2000:] + other.stderr[-3000:]
        assert f"--resume latest: no run named 'a_b' in experiment '{experiment}'" in other.stderr


def test_resume_of_a_finished_run_changes_nothing(native_stack, tmp_path):
    experiment = unique_experiment("guard-finished")
    run = train(native_stack, tmp_path / "a", experiment, *SMALL)
    with trainer_client(native_stack) as client:
        before = run_state(native_stack, client, run.run_id)
        assert before["status"] == "FINISHED"
        for ref in (run.run_id, "latest"):
            done = resume_cli(native_stack, tmp_path / f"b-{ref}", experiment, ref, *SMALL)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
            assert f"({run.run_id}) already finished (status FINISHED, latest checkpoint " \
                   f"checkpoints/step-00000008): nothing to resume, nothing changed" in done.stdout
            assert run_state(native_stack, client, run.run_id) == before
            assert not list((tmp_path / f"b-{ref}").glob("*/checkpoint-*"))  # nothing even downloaded


def test_run_that_crashed_after_its_last_step_finishes_without_training(native_stack, tmp_path):
    """Its last checkpoint is at max_steps (the trainer died logging the final model): no step past it."""
    experiment = unique_experiment("guard-final")
    run = train(native_stack, tmp_path / "a", experiment, *SMALL)
    with trainer_client(native_stack) as client:
        crash(client, run.run_id)
        prefix = f"artifacts/{client.get_run(run.run_id).info.experiment_id}/{run.run_id}/artifacts/checkpoints/"
        checkpoints = object_digests(native_stack, prefix)
        history = {key: metric_steps(client, run.run_id, key) for key in ("loss", "eval_loss")}
        done = resume_cli(native_stack, tmp_path / "b", experiment, run.run_id, *SMALL, "log_final_model=true")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "step 8 is already max_steps (8): nothing left to train" in done.stderr
        assert f"({run.run_id}) finished at step 8" in done.stdout
        assert object_digests(native_stack, prefix) == checkpoints
        assert {key: metric_steps(client, run.run_id, key) for key in history} == history
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert tracking.final_model_uri(client, run.run_id) is not None  # what the crash left missing


def test_trainers_creating_one_new_experiment_at_once_all_get_it(native_stack):
    with trainer_client(native_stack) as client:
        for _round in range(10):
            name = unique_experiment("guard-new")
            barrier = threading.Barrier(4)

            def create():
                barrier.wait()
                return tracking.get_or_create_experiment(client, name)

            with ThreadPoolExecutor(4) as pool:
                ids = list(pool.map(lambda _: create(), range(4)))
            assert len(set(ids)) == 1 and ids[0] == client.get_experiment_by_name(name).experiment_id


def test_server_error_with_sql_text_reaches_the_user_without_it(native_stack):
    """What the server answers for a duplicate experiment holds SQL; what we print does not."""
    with trainer_client(native_stack) as client:
        name = unique_experiment("guard-sql")
        client.create_experiment(name)
        with pytest.raises(MlflowException) as raised:
            client.create_experiment(name)
    raw = str(raised.value)
    assert "INSERT INTO" in raw or "psycopg2" in raw  # the server's text does hold it
    text = server_errors.describe(raised.value)
    assert text == f"RESOURCE_ALREADY_EXISTS: Experiment(name={name}) already exists (database details withheld)"
