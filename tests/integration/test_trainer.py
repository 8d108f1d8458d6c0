"""mltrainer end to end against the session's native stack: real trainings of the tiny config.

Runs are shared between tests through module-scoped fixtures (a tiny training takes about a
minute on two cores). The bucket is read behind the server's back with the S3 root key.

configs/tiny.yaml: 20 steps, a save and an eval every 4 steps, keep the last 2 plus the best 1
by eval_loss.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from trainer_support import (
    MANIFEST, REPO, TINY, artifact_prefix, expected_best, metric_steps, object_digests, read_object, run_cli,
    finish, sha256, start_train, step_path, stored_checkpoints, train, trainer_client, unique_experiment,
)

SAVES = {4, 8, 12, 16, 20}
SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"
REDACTED = "***REDACTED***"
TRUNCATED = "...[truncated]"
LONG_NOTE = "".join(f"{i:05d}," for i in range(1400))  # 8400 characters, over MLflow's 6000


@pytest.fixture(scope="module")
def client(native_stack):
    with trainer_client(native_stack) as c:
        yield c


def secrets_config(root: Path) -> Path:
    """tiny.yaml with upload=last (no monitor), secrets in a tag, a tag value and training.hub_token, and a long tag."""
    cfg = yaml.safe_load((REPO / TINY).read_text())
    cfg["experiment"]["tags"] = {"api_token": SECRET, "comment": f"pushed with {SECRET}", "note": LONG_NOTE}
    cfg["training"]["hub_token"] = SECRET
    # No monitor: with one, the current best would be kept too ("never delete the best" applies to every mode).
    cfg["checkpoints"] = {"upload": "last"}
    cfg["model"]["name_or_path"] = str(REPO / cfg["model"]["name_or_path"])  # the config lives in a temp dir
    cfg["data"]["files"] = {k: str(REPO / v) for k, v in cfg["data"]["files"].items()}
    path = root / "secret.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(native_stack, client, tmp_path_factory):
    """Four trainings, shared by the tests of this module.

    * ``first``, ``second``: the unchanged tiny config, same output root and experiment; every
      object of ``first`` is hashed (from the bucket) before ``second`` starts.
    * ``keep_all``: upload every 8 steps and keep everything.
    * ``last``: upload=last, from a config carrying secrets and an over-long tag value.

    After ``first``, the other three train concurrently (each is mostly waiting on the server).
    """
    root = tmp_path_factory.mktemp("same-root")
    experiment = unique_experiment("trainer-default")
    first = train(native_stack, root, experiment, "log_final_model=true")
    before = object_digests(native_stack, artifact_prefix(client, first.run_id))
    last_root = tmp_path_factory.mktemp("last")
    procs = {
        "second": start_train(native_stack, root, experiment),
        "keep_all": start_train(
            native_stack, tmp_path_factory.mktemp("every-n"), unique_experiment("trainer-every-n"),
            "checkpoints.upload=every_n_steps", "checkpoints.every_n_steps=8",
            "checkpoints.save_last_k=null", "checkpoints.save_top_k=null", "checkpoints.monitor=null"),
        "last": start_train(native_stack, last_root, unique_experiment("trainer-last"),
                            config=secrets_config(last_root)),
    }
    try:
        done = {name: finish(proc) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {"root": root, "first": first, **done, "first_digests_before": before}


@pytest.fixture(scope="module")
def default_runs(runs):
    return {"root": runs["root"], "runs": [runs["first"], runs["second"]],
            "first_digests_before": runs["first_digests_before"]}


@pytest.fixture(scope="module")
def keep_all_run(runs):
    return runs["keep_all"]


@pytest.fixture(scope="module")
def last_run_with_secrets(runs):
    return runs["last"]


# -- 1. isolation ---------------------------------------------------------------------------


def test_two_runs_same_config_never_overwrite_each_other(native_stack, client, default_runs):
    first, second = default_runs["runs"]
    assert first.run_id != second.run_id
    assert first.name == second.name == "tiny-bert-sequence-classification"
    dirs = sorted(p.name for p in default_runs["root"].iterdir() if p.is_dir())
    assert dirs == sorted(f"{r.name}-{r.run_id}" for r in (first, second))
    for run in (first, second):
        assert sorted(p.name for p in (default_runs["root"] / f"{run.name}-{run.run_id}").glob("checkpoint-*")) \
            == sorted(f"checkpoint-{s}" for s in SAVES)

    prefixes = [artifact_prefix(client, r.run_id) for r in (first, second)]
    assert prefixes[0] != prefixes[1]
    stored = [stored_checkpoints(native_stack, p) for p in prefixes]
    assert all(stored)
    # Same store paths inside each run, but under different run ids: distinct objects.
    for prefix, checkpoints in zip(prefixes, stored):
        for path, manifest in checkpoints.items():
            assert manifest["store_path"] == path
            assert f"{prefix}{path}/{MANIFEST}" in native_stack.bucket_keys(prefix)

    after = object_digests(native_stack, prefixes[0])
    assert after == default_runs["first_digests_before"]
    assert any(k.endswith(MANIFEST) for k in after) and f"{prefixes[0]}config/config.yaml" in after


# -- 2. policy -> exactly these stored checkpoints ------------------------------------------


def test_default_policy_keeps_last_two_and_best(native_stack, client, default_runs):
    for run in default_runs["runs"]:
        evals = metric_steps(client, run.run_id, "eval_loss")
        assert [s for s, _ in evals] == sorted(SAVES)
        best = expected_best(evals, SAVES)
        prefix = artifact_prefix(client, run.run_id)
        stored = stored_checkpoints(native_stack, prefix)
        assert set(stored) == {step_path(16), step_path(20), step_path(best)}
        for path, manifest in stored.items():
            assert path == step_path(manifest["step"])
            assert manifest["metrics"]["eval_loss"] == pytest.approx(dict(evals)[manifest["step"]])
        tags = client.get_run(run.run_id).data.tags
        assert tags["checkpoint.latest"] == step_path(20)
        assert tags["checkpoint.best"] == step_path(best)


def test_every_n_steps_keep_all_stores_multiples_and_final(native_stack, client, keep_all_run):
    prefix = artifact_prefix(client, keep_all_run.run_id)
    stored = stored_checkpoints(native_stack, prefix)
    assert set(stored) == {step_path(8), step_path(16), step_path(20)}
    assert {m["step"] for m in stored.values()} == {8, 16, 20}
    # Nothing was uploaded for the saves at 4 and 12, not even partially.
    folders = {k[len(prefix):].split("/")[1] for k in native_stack.bucket_keys(prefix + "checkpoints/")}
    assert folders == {"step-00000008", "step-00000016", "step-00000020"}
    tags = client.get_run(keep_all_run.run_id).data.tags
    assert tags["checkpoint.latest"] == step_path(20)
    assert "checkpoint.best" not in tags  # no monitor, no best


def test_upload_last_keeps_only_the_final_checkpoint(native_stack, client, last_run_with_secrets):
    run = last_run_with_secrets
    prefix = artifact_prefix(client, run.run_id)
    stored = stored_checkpoints(native_stack, prefix)
    assert set(stored) == {step_path(20)}
    assert stored[step_path(20)]["step"] == 20
    tags = client.get_run(run.run_id).data.tags
    assert tags["checkpoint.latest"] == step_path(20)
    assert "checkpoint.best" not in tags  # no monitor, no best
    # Every save was uploaded and then evicted: no manifest, and no file left behind either.
    assert {k[len(prefix):].split("/")[1] for k in native_stack.bucket_keys(prefix + "checkpoints/")} \
        == {"step-00000020"}


# -- 3. manifests match the bucket; every folder whole ---------------------------------------


@pytest.mark.parametrize("which", ["default", "keep_all"])
def test_manifests_match_bucket_bytes_and_every_folder_is_whole(native_stack, client, default_runs, keep_all_run,
                                                                which):
    run = default_runs["runs"][0] if which == "default" else keep_all_run
    prefix = artifact_prefix(client, run.run_id)
    stored = stored_checkpoints(native_stack, prefix)
    objects = {k[len(prefix):]: k for k in native_stack.bucket_keys(prefix + "checkpoints/")}

    listed: set[str] = set()
    config_digests = set()
    for path, manifest in stored.items():
        for entry in manifest["files"]:
            # Each file in its checkpoint's own folder (unchanged ones copied by the server).
            assert entry["stored_at"] == f"{path}/{entry['path']}", entry
            data = read_object(native_stack, prefix + entry["stored_at"])
            assert len(data) == entry["size"], entry
            assert sha256(data) == entry["sha256"], entry
            listed.add(entry["stored_at"])
            if entry["path"] == "config.json":
                config_digests.add(entry["sha256"])
    assert len(config_digests) == 1 and len(stored) > 1  # the same file, in every folder
    # The bucket holds exactly the manifests plus the objects they list: no orphans, no leftovers.
    assert set(objects) == listed | {f"{p}/{MANIFEST}" for p in stored}


# -- 7, 8. params: secrets redacted, long values cut ----------------------------------------


def test_secrets_never_reach_params_tags_or_config_artifact(native_stack, client, last_run_with_secrets):
    run = client.get_run(last_run_with_secrets.run_id)
    params, tags = run.data.params, run.data.tags
    for where, values in (("param", params), ("tag", tags)):
        leaks = {k: v for k, v in values.items() if SECRET in v or SECRET in k}
        assert not leaks, f"secret in {where}s: {list(leaks)}"
    assert tags["api_token"] == REDACTED
    assert tags["comment"] == f"pushed with {REDACTED}"  # the token is replaced in place
    assert params["config.experiment.tags.api_token"] == REDACTED
    assert params["config.training.hub_token"] == REDACTED
    assert SECRET not in params.get("args.hub_token", "")

    prefix = artifact_prefix(client, run.info.run_id)
    text = read_object(native_stack, prefix + "config/config.yaml").decode()
    assert SECRET not in text
    logged = yaml.safe_load(text)
    assert logged["experiment"]["tags"]["api_token"] == REDACTED
    assert logged["training"]["hub_token"] == REDACTED
    # and nowhere in the stored objects of the run (checkpoints include training_args.bin)
    for key in native_stack.bucket_keys(prefix):
        if key.endswith((".json", ".yaml", ".txt", "MLmodel")):
            assert SECRET.encode() not in read_object(native_stack, key), key


def test_long_param_value_is_cut_with_a_marker_and_kept_whole_in_config_artifact(native_stack, client,
                                                                                  last_run_with_secrets):
    run = client.get_run(last_run_with_secrets.run_id)
    value = run.data.params["config.experiment.tags.note"]
    assert len(value) == 6000
    assert value.endswith(TRUNCATED)
    assert value == LONG_NOTE[: 6000 - len(TRUNCATED)] + TRUNCATED
    # The same value as a run tag: over MLflow's 8000-character tag limit, cut the same way.
    tag = run.data.tags["note"]
    assert len(tag) == 8000 and tag == LONG_NOTE[: 8000 - len(TRUNCATED)] + TRUNCATED
    text = read_object(native_stack, artifact_prefix(client, run.info.run_id) + "config/config.yaml").decode()
    assert yaml.safe_load(text)["experiment"]["tags"]["note"] == LONG_NOTE


# -- 9. mltrainer checkpoints ----------------------------------------------------------------


def test_checkpoints_command_lists_stored_steps_and_aliases(native_stack, client, default_runs):
    run = default_runs["runs"][0]
    best = expected_best(metric_steps(client, run.run_id, "eval_loss"), SAVES)
    proc = run_cli(native_stack, "checkpoints", "--run-id", run.run_id, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["step", "size", "state", "aliases", "path"]
    for line in lines[1:]:
        if not line.strip():
            break  # what each state means follows the table
        rows[re.search(r"(checkpoints/\S+)", line)[1]] = line
    complete = {path: line for path, line in rows.items() if re.search(r"\bcomplete\b", line)}
    assert set(complete) == {step_path(16), step_path(20), step_path(best)}
    for path, line in complete.items():
        step = int(path.rsplit("-", 1)[1])
        assert line.split()[0] == str(step)
        aliases = line.split()[4].split(",")
        expected = (["latest"] if step == 20 else []) + (["best"] if step == best else [])
        assert sorted(aliases) == sorted(expected) or (not expected and aliases == ["-"])
    # An evicted checkpoint leaves no folder behind to list.
    assert set(rows) == set(complete)


def test_checkpoints_command_unknown_run_id_fails_clearly(native_stack):
    bogus = "0" * 32
    proc = run_cli(native_stack, "checkpoints", "--run-id", bogus, timeout=120)
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: ")
    assert bogus in proc.stderr and "not found" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_final_model_is_logged_only_when_asked(native_stack, client, default_runs):
    first, second = default_runs["runs"]
    assert "Final model: models:/" in first.stdout
    assert "Final model: not logged" in second.stdout
    experiment_id = client.get_run(first.run_id).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id])
    finals = [m for m in models if m.model_type != "checkpoint"]  # each kept checkpoint is a model too
    assert [m.source_run_id for m in finals] == [first.run_id]
    assert {m.source_run_id for m in models if m.model_type == "checkpoint"} == {first.run_id, second.run_id}
