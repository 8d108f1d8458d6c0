"""``mltrainer checkpoints`` says what "complete" means, and ``--verify`` checks the objects.

"complete" means the manifest is present. Before, a checkpoint with one of its objects deleted
behind the server's back (here with the S3 root key) was listed as "complete" with nothing to
say otherwise, and only a resume found out.
"""

from __future__ import annotations

import re

import pytest

from trainer_support import artifact_prefix, run_cli, step_path, train, trainer_client, unique_experiment

LEGEND_COMPLETE = ("complete: its manifest.json is present (uploaded last, once every file was stored); "
                   "the files themselves were not checked (--verify checks them)")
LEGEND_VERIFIED = ("complete: its manifest.json is present, and every file it lists is in the store with the "
                   "listed size (checked by listing; contents are not read, a resume checks their CRC-32)")

MISSING = f"{step_path(8)}/model.safetensors"  # deleted behind the server's back
# step, size ("57.6 MB" or "-"), state, aliases, store path
TABLE_ROW = re.compile(r"^ *\S+ +(?:\S+ MB|-) +(?P<state>\S+) +\S+ +(?P<path>checkpoints/\S+)", re.M)


@pytest.fixture(scope="module")
def run(native_stack, tmp_path_factory):
    """Saves at steps 4 and 8, both kept; ``--verify`` run once while intact, then one object deleted."""
    done = train(native_stack, tmp_path_factory.mktemp("verify"), unique_experiment("verify"),
                 "training.max_steps=8", "checkpoints.save_last_k=null", "checkpoints.save_top_k=null",
                 "checkpoints.monitor=null")
    intact = run_cli(native_stack, "checkpoints", "--run-id", done.run_id, "--verify")
    with trainer_client(native_stack) as client:
        prefix = artifact_prefix(client, done.run_id)
    native_stack.s3_root().delete_object(Bucket=native_stack.bucket, Key=prefix + MISSING)
    return done.run_id, intact


def rows(stdout: str) -> dict[str, str]:
    """store path -> state, from the table."""
    return {m["path"]: m["state"] for m in TABLE_ROW.finditer(stdout)}


def test_verify_of_intact_checkpoints_exits_0_saying_what_it_checked(run):
    _, intact = run
    assert intact.returncode == 0, intact.stderr[-2000:]
    assert rows(intact.stdout) == {step_path(4): "complete", step_path(8): "complete"}
    assert LEGEND_VERIFIED in intact.stdout


def test_listing_says_complete_means_the_manifest_is_present(native_stack, run):
    listed = run_cli(native_stack, "checkpoints", "--run-id", run[0])
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert rows(listed.stdout)[step_path(8)] == "complete"  # only the manifest was looked at ...
    assert LEGEND_COMPLETE in listed.stdout  # ... and the table says so


def test_verify_names_the_missing_object_and_exits_6(native_stack, run):
    verified = run_cli(native_stack, "checkpoints", "--run-id", run[0], "--verify")
    assert verified.returncode == 6, verified.stdout + verified.stderr[-2000:]
    assert rows(verified.stdout) == {step_path(4): "complete", step_path(8): "damaged"}
    assert "damaged: its manifest.json is present, but a file it lists is missing or has another size" in verified.stdout
    assert f"{MISSING}: missing (the manifest lists " in verified.stdout
    last = verified.stderr.strip().splitlines()[-1]
    assert last.startswith(f"damaged checkpoint {step_path(8)}: {MISSING}: missing (the manifest lists "), last
