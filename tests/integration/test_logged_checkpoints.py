"""Checkpoints as MLflow LoggedModels, each folder whole, on the real stack (issue 14, items 1-3).

configs/tiny.yaml: 20 steps, a save and an eval every 4 steps, keep the last 2 plus the best 1 by
eval_loss, so retention evicts while the run trains. The bucket is read behind the server's back
with the S3 root key.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from playwright.sync_api import Error as PlaywrightError

from browser import UI_TIMEOUT_MS, VIEWPORT, chromium, screenshot_dir, screenshot_on_failure, table_row
from trainer_support import (
    MANIFEST, REPO, RUN_LINE, TINY, artifact_prefix, read_object, run_cli, sha256, step_path,
    stored_checkpoints, train, train_args, trainer_client, trainer_env, unique_experiment,
)

SLOW_MANIFESTS = Path(__file__).with_name("slow_manifests.py")
SAVES = {4, 8, 12, 16, 20}
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


@pytest.fixture(scope="module")
def client(native_stack):
    with trainer_client(native_stack) as c:
        yield c


def checkpoint_models(client, run_id: str) -> dict[str, object]:
    """store path -> LoggedModel, for the run's live checkpoint models."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND model_type = 'checkpoint'")
    by_path = {}
    for model in models:
        assert model.params["store_path"] not in by_path, f"two models of {model.params['store_path']}"
        by_path[model.params["store_path"]] = model
    return by_path


class Watcher(threading.Thread):
    """Looks at the run, again and again while it trains: the models the server lists, then the
    manifests in the bucket, then the models again. A model listed both times existed all along
    (a deleted model never comes back), so its manifest must have been there in between."""

    def __init__(self, stack, client, experiment: str):
        super().__init__(daemon=True)
        self.stack, self.client, self.experiment = stack, client, experiment
        self.stop = threading.Event()
        self.without_manifest: list[str] = []  # models seen while their checkpoint had no manifest
        self.pending_folders: set[str] = set()  # folders seen with files and no manifest (and no model)

    def run(self):
        while not self.stop.is_set():
            exp = self.client.get_experiment_by_name(self.experiment)
            runs = self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
            if not runs:
                self.stop.wait(0.2)
                continue
            run_id = runs[0].info.run_id
            before = set(checkpoint_models(self.client, run_id))
            prefix = artifact_prefix(self.client, run_id)
            keys = self.stack.bucket_keys(prefix + "checkpoints/")
            folders = {k[len(prefix):].rsplit("/", 1)[0] for k in keys}
            complete = {k[len(prefix):-len("/" + MANIFEST)] for k in keys if k.endswith("/" + MANIFEST)}
            after = set(checkpoint_models(self.client, run_id))
            self.without_manifest += sorted((before & after) - complete)
            self.pending_folders |= (folders - complete) - before - after
            self.stop.wait(0.2)


@pytest.fixture(scope="module")
def experiment():
    return unique_experiment("logged-checkpoints")


@pytest.fixture(scope="module")
def trained(native_stack, client, experiment, tmp_path_factory):
    """The tiny config, each manifest stored 1.5 s after its files, watched while it trains."""
    watcher = Watcher(native_stack, client, experiment)
    watcher.start()
    try:
        done = subprocess.run([sys.executable, str(SLOW_MANIFESTS),
                               *train_args(tmp_path_factory.mktemp("trained"), experiment)],
                              cwd=REPO, env=trainer_env(native_stack), capture_output=True, text=True, timeout=400)
    finally:
        watcher.stop.set()
        watcher.join(timeout=30)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = RUN_LINE.search(done.stdout)
    assert match, done.stdout[-3000:]
    run_id = match["run_id"]
    prefix = artifact_prefix(client, run_id)
    return {"run_id": run_id, "prefix": prefix, "watcher": watcher, "output": done.stdout + done.stderr,
            "stored": stored_checkpoints(native_stack, prefix)}


def test_a_runs_logged_models_are_its_kept_checkpoints(client, trained):
    run = client.get_run(trained["run_id"])
    models = checkpoint_models(client, trained["run_id"])
    stored = trained["stored"]
    assert set(models) == set(stored) and len(stored) < len(SAVES)  # retention evicted, the models followed
    for path, model in models.items():
        manifest = stored[path]
        assert model.status == LoggedModelStatus.READY
        assert model.name == "checkpoint-" + path.rsplit("/", 1)[1]
        assert model.params["step"] == str(manifest["step"])
        assert model.params["size_bytes"] == str(manifest["total_bytes"])
        linked = {m.key: (m.value, m.step) for m in model.metrics}
        assert linked["eval_loss"] == (manifest["metrics"]["eval_loss"], manifest["step"])
    # latest/best marked on the models the run's tags name, and on no other.
    tags = run.data.tags
    for tag in ("checkpoint.latest", "checkpoint.best"):
        assert {p for p, m in models.items() if m.tags.get(tag) == "true"} == {tags[tag]}
    # Linking re-sent the run's own points: its history has one eval_loss per eval, no second copy.
    history = [m.step for m in client.get_metric_history(trained["run_id"], "eval_loss")]
    assert history == sorted(SAVES)


def test_no_model_shows_before_its_checkpoints_manifest(trained):
    watcher = trained["watcher"]
    assert watcher.without_manifest == []
    # The watcher did look inside the window: it saw folders uploading, without a manifest, without a model.
    assert watcher.pending_folders, "the watcher never saw a checkpoint mid-upload"


def test_searching_models_by_metric_finds_the_best_checkpoint(client, trained):
    run = client.get_run(trained["run_id"])
    (best,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{trained['run_id']}' AND model_type = 'checkpoint'",
        order_by=[{"field_name": "metrics.eval_loss", "ascending": True}], max_results=1)
    assert best.params["store_path"] == run.data.tags["checkpoint.best"]
    losses = {p: m["metrics"]["eval_loss"] for p, m in trained["stored"].items()}
    assert best.params["store_path"] == min(losses, key=lambda p: (losses[p], p))


def test_every_folder_is_whole_and_eviction_leaves_no_object(native_stack, trained):
    prefix, stored = trained["prefix"], trained["stored"]
    keys = native_stack.bucket_keys(prefix + "checkpoints/")
    by_folder: dict[str, set[str]] = {}
    for key in keys:
        folder, name = key[len(prefix):].rsplit("/", 1)
        by_folder.setdefault(folder, set()).add(name)
    assert set(by_folder) == set(stored)  # evicted checkpoints: not one object left
    for path, manifest in stored.items():
        assert {e["stored_at"] for e in manifest["files"]} == {f"{path}/{e['path']}" for e in manifest["files"]}
        assert by_folder[path] == {e["path"] for e in manifest["files"]} | {MANIFEST}
        assert CHECKPOINT_FILES <= by_folder[path], path
        for entry in manifest["files"]:
            assert sha256(read_object(native_stack, prefix + entry["stored_at"])) == entry["sha256"]
    # The unchanged files (config, tokenizer, training args) were copied by the server, not sent again.
    copied = re.findall(r"stored checkpoint (\S+): (\d+) bytes sent, (\d+) bytes of unchanged files copied",
                        trained["output"])
    assert [path for path, _, _ in copied] == [step_path(s) for s in sorted(SAVES)]
    first = copied[0]
    assert int(first[2]) == 0 and all(int(c) > 0 for _, _, c in copied[1:]), copied
    assert "makes no server-side copies" not in trained["output"]


def test_a_folder_downloaded_through_mlflow_loads_and_resumes(native_stack, client, trained, tmp_path):
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer

    from mltrainer.config import load_config
    from mltrainer.modeling import prepare
    from mltrainer.train import build_training_arguments

    path = min(trained["stored"], key=lambda p: trained["stored"][p]["step"])  # the oldest kept: steps left to train
    step = trained["stored"][path]["step"]
    folder = Path(download_artifacts(run_id=trained["run_id"], artifact_path=path, dst_path=str(tmp_path),
                                     tracking_uri=native_stack.uri))
    assert {p.name for p in folder.iterdir()} >= CHECKPOINT_FILES
    AutoTokenizer.from_pretrained(folder)
    AutoModelForSequenceClassification.from_pretrained(folder)

    cfg = load_config(REPO / TINY, [f"output_root={tmp_path / 'out'}"])
    prepared = prepare(cfg)
    args = build_training_arguments(cfg)
    args.output_dir = str(tmp_path / "out")
    trainer = Trainer(model=prepared.model, args=args, train_dataset=prepared.train_dataset,
                      eval_dataset=prepared.eval_dataset, data_collator=prepared.data_collator,
                      processing_class=prepared.tokenizer)
    trainer.train(resume_from_checkpoint=str(folder))
    assert step < 20 and trainer.state.global_step == 20


def to_earlier_layout(stack, client, run_id: str) -> None:
    """Rewrite a finished run of steps 4, 8 and 12 as the earlier layout left it, with step 4 evicted:
    a file identical to one stored before is only in the older folder, the manifest pointing there
    (``stored_at``); an evicted folder keeps the files a kept checkpoint lists; no LoggedModels."""
    prefix = artifact_prefix(client, run_id)
    s3, bucket = stack.s3_root(), stack.bucket
    first_stored: dict[str, str] = {}  # sha256 -> stored_at
    for step in (4, 8, 12):
        key = f"{prefix}{step_path(step)}/{MANIFEST}"
        manifest = json.loads(read_object(stack, key))
        for entry in manifest["files"]:
            if (older := first_stored.get(entry["sha256"])) is not None:
                s3.delete_object(Bucket=bucket, Key=prefix + entry["stored_at"])
                entry["stored_at"] = older
            else:
                first_stored[entry["sha256"]] = entry["stored_at"]
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())
    listed = {e["stored_at"] for step in (8, 12)
              for e in json.loads(read_object(stack, f"{prefix}{step_path(step)}/{MANIFEST}"))["files"]}
    for key in stack.bucket_keys(f"{prefix}{step_path(4)}/"):
        if key[len(prefix):] not in listed:
            s3.delete_object(Bucket=bucket, Key=key)  # step 4 evicted: only what 8 and 12 list stays
    assert listed & set(k[len(prefix):] for k in stack.bucket_keys(f"{prefix}{step_path(4)}/"))
    for model in checkpoint_models(client, run_id).values():
        client.delete_logged_model(model.model_id)
    client.set_terminated(run_id, "FAILED")  # as if its trainer had died: resumable


@pytest.fixture(scope="module")
def earlier_layout(native_stack, client, experiment, trained, tmp_path_factory):
    """A run of steps 4, 8 and 12 rewritten to the earlier layout, then resumed to step 20 keeping
    the newest checkpoint (and the one resumed from). In ``trained``'s experiment, after it."""
    tmp = tmp_path_factory.mktemp("earlier-layout")
    no_monitor = ("checkpoints.upload=every_save", "checkpoints.save_top_k=null", "checkpoints.monitor=null")
    first = train(native_stack, tmp / "a", experiment, "training.max_steps=12", "checkpoints.save_last_k=null",
                  *no_monitor)  # keeps 4, 8 and 12
    to_earlier_layout(native_stack, client, first.run_id)
    resumed = run_cli(native_stack, *train_args(tmp / "b", experiment, *no_monitor, "checkpoints.save_last_k=1"),
                      "--resume", first.run_id)
    return {"first": first, "resumed": resumed}


def test_a_run_stored_by_the_earlier_layout_resumes(native_stack, client, earlier_layout):
    first, done = earlier_layout["first"], earlier_layout["resumed"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Run {first.name} ({first.run_id}) finished at step 20" in done.stdout
    assert "Downloading checkpoints/step-00000012" in done.stdout + done.stderr

    prefix = artifact_prefix(client, first.run_id)
    stored = stored_checkpoints(native_stack, prefix)
    # Kept: the newest (20) and the one resumed from (12, still in the earlier layout).
    assert set(stored) == {step_path(12), step_path(20)}
    assert set(checkpoint_models(client, first.run_id)) == set(stored)  # 12 got its model on resume
    newest = stored[step_path(20)]
    assert all(e["stored_at"].startswith(step_path(20) + "/") for e in newest["files"])  # the new form: whole
    # No orphans: every object is a kept manifest or listed by one (step 4's shared files for step 12).
    listed = {e["stored_at"] for m in stored.values() for e in m["files"]} | {f"{p}/{MANIFEST}" for p in stored}
    assert {k[len(prefix):] for k in native_stack.bucket_keys(prefix + "checkpoints/")} == listed
    table = run_cli(native_stack, "checkpoints", "--run-id", first.run_id, "--verify")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "damaged" not in table.stdout and "step-00000020" in table.stdout


def test_best_checkpoint_across_the_experiments_runs_is_registered_under_an_alias(
        native_stack, client, experiment, trained, earlier_layout, tmp_path):
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForSequenceClassification

    kept = {(run_id, path): m["metrics"]["eval_loss"]
            for run_id in (trained["run_id"], earlier_layout["first"].run_id)
            for path, m in stored_checkpoints(native_stack, artifact_prefix(client, run_id)).items()}
    run_id, path = min(kept, key=lambda k: (kept[k], int(k[1].rsplit("-", 1)[1])))
    name = unique_experiment("best-checkpoint")
    done = run_cli(native_stack, "best", "--checkpoints", "--experiment", experiment, "--metric", "eval_loss",
                   "--mode", "min", "--register", name, "--alias", "champion")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Best: checkpoint {path} of run {run_id} eval_loss=" in done.stdout
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id == run_id and version.tags["mltrainer.checkpoint.step"] == path.rsplit("-", 1)[1].lstrip("0")
    folder = Path(download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path), tracking_uri=native_stack.uri))
    AutoModelForSequenceClassification.from_pretrained(folder)


def test_the_ui_lists_each_checkpoint_with_its_step_metrics_and_marks(native_stack, client, trained):
    """Chromium, logged in as the trainer by HTTP basic auth, on the links the trainer prints."""
    run = client.get_run(trained["run_id"])
    models = checkpoint_models(client, trained["run_id"])
    latest, best = run.data.tags["checkpoint.latest"], run.data.tags["checkpoint.best"]
    links = dict(re.findall(r"^  (UI|Checkpoints): +(\S+)$", trained["output"], re.M))
    # Filed as model development, which the links open the UI in ("Model training" mode).
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    shots = screenshot_dir()
    with chromium() as browser:
        # The server asks for credentials: a browser that has none is refused (Chromium's error for a 401).
        anonymous = browser.new_context()
        anonymous.set_default_timeout(UI_TIMEOUT_MS)
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.new_page().goto(links["Checkpoints"])
        anonymous.close()

        user, password = native_stack.trainer_auth
        page = browser.new_context(http_credentials={"username": user, "password": password},
                                   viewport=VIEWPORT).new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        with screenshot_on_failure(page, shots / "failed.png"):
            check_checkpoints_in_the_ui(page, client, run, models, links, latest, best, shots)


def check_checkpoints_in_the_ui(page, client, run, models, links, latest, best, shots) -> None:
    """The Models tab lists every live checkpoint model with its eval_loss; each model's page shows
    its step, its metrics and its latest/best marks."""
    page.goto(links["Checkpoints"])
    page.get_by_role("heading", name="Models").wait_for()
    # Other tests of this module train more runs into the experiment: the page lists every live
    # checkpoint model of it, this run's kept ones among them, and nothing else.
    listed = {m.model_id: m.name for m in client.search_logged_models(
        [run.info.experiment_id], filter_string="model_type = 'checkpoint'")}
    assert {m.model_id for m in models.values()} <= set(listed)
    names = page.locator("[role=gridcell][col-id=name] a")
    names.nth(len(listed) - 1).wait_for()
    page.screenshot(path=str(shots / "checkpoint-models.png"))
    rows = page.eval_on_selector_all(
        "[role=row][row-id]", "rows => rows.map(r => [r.getAttribute('row-id'), r.querySelector('[col-id=name] a')?.innerText])")
    assert {row_id: name for row_id, name in rows if name} == listed
    for model in models.values():  # each row shows the eval_loss linked at its step
        loss = next(m.value for m in model.metrics if m.key == "eval_loss")
        cell = page.locator(f'[row-id="{model.model_id}"] [role=gridcell][col-id*="eval_loss"]')
        assert cell.inner_text() == repr(loss)

    for path, model in sorted(models.items()):
        page.locator(f'[row-id="{model.model_id}"] [role=gridcell][col-id=name] a').click()
        page.get_by_role("heading", name=model.name).wait_for()
        marks = [word for word, at in (("latest", latest), ("best by eval_loss", best)) if at == path]
        description = f"Step {model.params['step']}" + (": " + ", ".join(marks) if marks else "")
        page.get_by_text(description, exact=True).wait_for()
        assert table_row(page, "step") == ["step", model.params["step"]]
        loss = next(m.value for m in model.metrics if m.key == "eval_loss")
        assert table_row(page, "eval_loss")[-1] == repr(loss)
        page.screenshot(path=str(shots / f"{model.name}.png"))
        page.go_back()
        names.nth(len(listed) - 1).wait_for()
