"""torchrun across two "nodes" on loopback: one MLflow run, every stored checkpoint complete.

Each node is its own torchrun (``--nnodes 2 --node_rank 0|1``, one CPU process each, gloo) with its
own output directory, so no file written by one is visible to the other, as on two machines
without a shared disk. Node 1 writes files node 0 does not have (``rng_state_1.pth``, and with
``save_on_each_node`` its own optimizer and trainer state): they must reach the store from node 1,
before the main process writes the manifest. A node that claims files it never sent
(skip_node_uploads.py) leaves its checkpoint without a manifest, and the resume skips it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mlstack.native.processes import free_port
from trainer_support import (
    MANIFEST, REPO, RUN_LINE, artifact_prefix, metric_steps, read_object, sha256, step_path, stored_checkpoints,
    train_args, trainer_client, trainer_env, unique_experiment,
)

TORCHRUN = Path(sys.executable).parent / "torchrun"
HERE = Path(__file__).parent
SKIP_NODE_UPLOADS = HERE / "skip_node_uploads.py"
# What node 0 (global rank 0) writes into every checkpoint of the tiny model; node 1 adds its RNG state.
NODE0_FILES = {"config.json", "model.safetensors", "optimizer.pt", "rng_state_0.pth", "scheduler.pt",
               "tokenizer.json", "tokenizer_config.json", "trainer_state.json", "training_args.bin"}
ALL_FILES = NODE0_FILES | {"rng_state_1.pth"}
EXIT_UPLOAD = 4


def run_two_nodes(stack, outputs: Path, experiment: str, *overrides: str, program: list[str] | None = None,
                  timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Both nodes to the end; node n trains in ``outputs/node<n>``. ``program``: a driver script
    (and its own arguments) in place of ``-m mltrainer.cli``."""
    port = free_port()
    procs = []
    for node in (0, 1):
        out = outputs / f"node{node}"
        out.mkdir(parents=True)
        cmd = [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               *(program or ["-m", "mltrainer.cli"]), *train_args(out, experiment, *overrides)]
        log = (out.with_suffix(".stdout"), out.with_suffix(".stderr"))
        with open(log[0], "w") as stdout, open(log[1], "w") as stderr:
            proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(stack, OMP_NUM_THREADS="1"), stdout=stdout,
                                    stderr=stderr, text=True)
        procs.append((proc, log))
    done = []
    try:
        for proc, log in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in procs:
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text()))
    return done


def output(nodes: list[subprocess.CompletedProcess]) -> str:
    return "\n".join(f"--- node {n} (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-5000:]}"
                     for n, p in enumerate(nodes))


def assert_every_checkpoint_complete(stack, prefix: str, expect_files: set[str],
                                     incomplete: set[str] = frozenset()) -> dict[str, dict]:
    """Every stored checkpoint's manifest lists ``expect_files``, each stored with its sha256,
    and the bucket holds nothing else under checkpoints/ but the folders ``incomplete``."""
    stored = stored_checkpoints(stack, prefix)
    keys = {k[len(prefix):] for k in stack.bucket_keys(prefix + "checkpoints/")
            if not any(k[len(prefix):].startswith(f"{path}/") for path in incomplete)}
    for path, manifest in stored.items():
        assert {e["path"] for e in manifest["files"]} == expect_files, (path, manifest["files"])
        for entry in manifest["files"]:
            assert entry["stored_at"] == f"{path}/{entry['path']}"
            assert sha256(read_object(stack, prefix + entry["stored_at"])) == entry["sha256"], entry
    assert keys == {e["stored_at"] for m in stored.values() for e in m["files"]} | {f"{p}/{MANIFEST}" for p in stored}
    return stored


def test_two_nodes_one_run_complete_checkpoints_and_resume_on_two_fresh_nodes(native_stack, tmp_path):
    experiment = unique_experiment("trainer-2nodes")
    common = ("training.max_steps=8", "training.save_steps=4", "training.eval_steps=4")
    # First pair: node 1 stores its files of step 4, then claims those of step 8 without sending them.
    first = run_two_nodes(native_stack, tmp_path / "first", experiment, *common,
                          program=[str(SKIP_NODE_UPLOADS), "2"])
    trains_in = {re.search(r"INFO mltrainer\.train: run ([0-9a-f]{32}) trains in", p.stderr)[1] for p in first}
    assert len(trains_in) == 1, output(first)  # both nodes trained in the run rank 0 created
    (run_id,) = trains_in
    assert "node 1 stored its 1 file(s) of checkpoint checkpoints/step-00000004" in first[1].stderr, output(first)
    # Step 8 is refused: torchrun exits 1 for a failed worker and names its exit code (an upload error).
    assert first[0].returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_UPLOAD}\b", first[0].stderr), output(first)
    assert re.search(r"checkpoints/step-00000008: files other nodes reported stored are not in the store "
                     r"\(node 1: checkpoints/step-00000008/rng_state_1\.pth: missing", first[0].stderr), output(first)
    # No shared disk: node 1's folder holds only what node 1 wrote.
    node1_dir = next((tmp_path / "first" / "node1").glob("*/checkpoint-4"))
    assert {p.name for p in node1_dir.iterdir()} == {"rng_state_1.pth"}

    with trainer_client(native_stack) as client:
        exp = client.get_experiment_by_name(experiment)
        assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
        assert client.get_run(run_id).info.status == "FAILED"
        prefix = artifact_prefix(client, run_id)
    stored = assert_every_checkpoint_complete(native_stack, prefix, ALL_FILES, incomplete={step_path(8)})
    assert set(stored) == {step_path(4)}
    assert f"{prefix}{step_path(8)}/model.safetensors" in native_stack.bucket_keys(prefix)  # node 0's part went up

    # Second pair, fresh empty folders, node 1 saving its own copies too: it continues from step 4,
    # the newest complete checkpoint, and stores step 8 whole this time.
    second = run_two_nodes(native_stack, tmp_path / "second", experiment, *common,
                           "training.save_on_each_node=true", program=["-m", "mltrainer.cli", "--resume", run_id])
    assert all(p.returncode == 0 for p in second), output(second)
    assert [(m["run_id"], m["step"]) for m in RUN_LINE.finditer(second[0].stdout)] == [(run_id, "8")]
    assert "skipping checkpoint checkpoints/step-00000008: no manifest" in second[0].stderr, output(second)
    for node in second:  # each node has the checkpoint on its own disk and starts where it ends
        assert "first training step started (step 5)" in node.stderr, output(second)
    assert "node 1 has checkpoint checkpoints/step-00000004" in second[1].stderr, output(second)
    node1_dir = next((tmp_path / "second" / "node1").glob("*/checkpoint-8"))
    # save_on_each_node: node 1 writes all but the weights and model config, which only global rank 0 writes.
    assert {p.name for p in node1_dir.iterdir()} == ALL_FILES - {"model.safetensors", "config.json", "rng_state_0.pth"}

    with trainer_client(native_stack) as client:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["checkpoint.latest"] == step_path(8)
        losses = [s for s, _ in metric_steps(client, run_id, "loss")]
        assert losses == [2, 4, 6, 8] and max(Counter(losses).values()) == 1, losses
    stored = assert_every_checkpoint_complete(native_stack, prefix, ALL_FILES)
    assert set(stored) == {step_path(4), step_path(8)} and stored[step_path(8)]["step"] == 8
    # Node 0's copies are the stored ones (node 1's trainer_state.json says it is not world process zero).
    state = read_object(native_stack, f"{prefix}{step_path(8)}/trainer_state.json")
    assert b'"is_world_process_zero": true' in state
