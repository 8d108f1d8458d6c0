"""gc's rules (mlstack.gc.plan) on made-up listings, and its copy of the trainer's contract held to mltrainer's."""

from __future__ import annotations

import json
import time

import pytest

from mlstack.gc import trainer_contract as tc
from mlstack.gc.age import parse_age
from mlstack.gc.plan import ArtifactKeys, make_plan
from mlstack.gc.records import (Catalog, ExperimentRecord, ModelRecord, ModelVersionRecord, PendingUpload,
                                RunRecord, StoredObject)
from mltrainer import lease as trainer_lease
from mltrainer import manifest as trainer_manifest
from mltrainer import naming

NOW = 2_000_000_000.0
DAY = 86400.0
OLD = NOW - 40 * DAY  # older than the 30 days these tests collect at
KEYS = ArtifactKeys("mlflow", "artifacts")
RUN_A, RUN_B = "a" * 32, "b" * 32


def lease_tag(*, held: bool) -> str:
    return trainer_lease.Lease("o", "h", 1, NOW if held else OLD, 60.0).to_tag()


def run(run_id, *, deleted=False, status="FINISHED", lease=None, exp="1") -> RunRecord:
    return RunRecord(run_id, exp, f"mlflow-artifacts:/{exp}/{run_id}/artifacts", "deleted" if deleted else "active",
                     status, int(OLD * 1000) if deleted else None, lease)


def obj(key, size=10, modified=OLD) -> StoredObject:
    return StoredObject(key, size, "etag-" + key, modified)


def catalog(*runs, models=(), versions=(), experiments=None) -> Catalog:
    exps = experiments or [ExperimentRecord("1", "mlflow-artifacts:/1", "active", int(OLD * 1000))]
    return Catalog({e.experiment_id: e for e in exps}, {r.run_id: r for r in runs},
                   {m.model_id: m for m in models}, list(versions))


def plan(objects, cat, uploads=(), files=None):
    files = files or {}
    return make_plan(list(objects), list(uploads), cat, now=NOW, min_age=30 * DAY, keys=KEYS,
                     read_object=lambda key: files[key])


def removed(p) -> set[str]:
    return {o.key for r in p.removals for o in r.objects}


# -- the contract with mltrainer ----------------------------------------------------------------

def test_contract_names_are_mltrainers():
    assert tc.LEASE_TAG == trainer_lease.LEASE_TAG
    assert tc.MANIFEST_NAME == trainer_manifest.MANIFEST_NAME
    assert tc.MANIFEST_FORMAT == trainer_manifest.MANIFEST_FORMAT
    assert tc.CHECKPOINTS_ROOT == naming.DEFAULT_ROOT


@pytest.mark.parametrize("renewed_ago, lease_seconds, released", [
    (0, 60, False), (59, 60, False), (61, 60, False), (10, 60, True), (-30, 60, False), (3600, 7200, False)])
def test_lease_state_agrees_with_mltrainer(renewed_ago, lease_seconds, released):
    now = time.time()
    tag = trainer_lease.Lease("o", "h", 1, now - renewed_ago, lease_seconds, released).to_tag()
    held_for_trainer = trainer_lease.holder({trainer_lease.LEASE_TAG: tag}, now) is not None
    assert tc.lease_state(tag, now) == ("held" if held_for_trainer else "free")


def test_manifest_references_read_a_real_manifest():
    entry = trainer_manifest.ManifestEntry("model.bin", 1, "0" * 64, "checkpoints/step-0/model.bin", "00000000")
    m = trainer_manifest.Manifest(1, {}, "checkpoints/step-1", "2026-01-01T00:00:00Z", (entry,))
    assert tc.manifest_references(m.to_json().encode()) == {"checkpoints/step-0/model.bin"}
    for bad in (b"{", b"[]", json.dumps({"format": 2, "files": []}).encode()):
        with pytest.raises(ValueError):
            tc.manifest_references(bad)
    assert tc.lease_state("not json", NOW) == "unknown" and tc.lease_state(None, NOW) == "unknown"


def test_ages():
    assert parse_age("30d") == 30 * DAY and parse_age("1d12h") == 1.5 * DAY and parse_age("0s") == 0
    assert parse_age("90m") == 5400
    for bad in ("", "30", "30 days", "d", "-1d"):
        with pytest.raises(ValueError, match="is not an age"):
            parse_age(bad)


def test_artifact_uris_map_to_our_bucket_only():
    assert KEYS.prefix("mlflow-artifacts:/1/abc/artifacts") == "artifacts/1/abc/artifacts/"
    assert KEYS.prefix("mlflow-artifacts://server:5000/1/abc/artifacts") == "artifacts/1/abc/artifacts/"
    assert KEYS.prefix("s3://mlflow/elsewhere/x") == "elsewhere/x/"
    assert KEYS.prefix("s3://other-bucket/x") is None and KEYS.prefix("file:///tmp/x") is None


# -- the rules ----------------------------------------------------------------------------------

def test_registered_model_of_a_deleted_run_stays_with_its_files():
    model = ModelRecord("m-1", "1", "mlflow-artifacts:/1/models/m-1/artifacts", "active", int(OLD * 1000), RUN_A)
    version = ModelVersionRecord("clf", 1, "models:/m-1", "mlflow-artifacts:/1/models/m-1/artifacts")
    objects = [obj(f"artifacts/1/{RUN_A}/artifacts/x.bin"), obj("artifacts/1/models/m-1/artifacts/model.bin")]
    p = plan(objects, catalog(run(RUN_A, deleted=True), models=[model], versions=[version]))
    assert removed(p) == {f"artifacts/1/{RUN_A}/artifacts/x.bin"}
    assert any("registered model 'clf' version 1" in k for k in p.kept)
    # Without the version, the deleted run's model goes with it.
    p = plan(objects, catalog(run(RUN_A, deleted=True), models=[model]))
    assert removed(p) == {o.key for o in objects}


def test_a_version_registered_from_runs_uri_keeps_the_deleted_run():
    version = ModelVersionRecord("clf", 2, f"runs:/{RUN_A}/model", f"mlflow-artifacts:/1/{RUN_A}/artifacts/model")
    p = plan([obj(f"artifacts/1/{RUN_A}/artifacts/model/MLmodel")], catalog(run(RUN_A, deleted=True), versions=[version]))
    assert p.removals == [] and any(f"run {RUN_A}" in k for k in p.kept)


def test_deleted_experiment_goes_only_with_all_its_runs():
    exp = ExperimentRecord("1", "mlflow-artifacts:/1", "deleted", int(OLD * 1000))
    objects = [obj(f"artifacts/1/{RUN_A}/artifacts/x"), obj("artifacts/1/traces/tr-1/artifacts/traces.json")]
    p = plan(objects, catalog(run(RUN_A, deleted=True), experiments=[exp]))
    assert [(r.kind, r.row) for r in p.removals] == [("run", ("run", RUN_A)), ("experiment", ("experiment", "1"))]
    assert removed(p) == {o.key for o in objects}
    p = plan(objects, catalog(run(RUN_A, deleted=True), run(RUN_B), experiments=[exp]))
    assert [r.kind for r in p.removals] == ["run"] and any(f"run {RUN_B}" in k for k in p.kept)


def test_young_deletions_and_objects_stay():
    young = RunRecord(RUN_A, "1", f"mlflow-artifacts:/1/{RUN_A}/artifacts", "deleted", "FINISHED",
                      int((NOW - DAY) * 1000), None)
    objects = [obj(f"artifacts/1/{RUN_A}/artifacts/x"), obj(f"artifacts/1/{RUN_B}/artifacts/y", modified=NOW - DAY)]
    assert plan(objects, catalog(young)).removals == []


def test_leftovers_judged_per_checkpoint_folder_nested_or_not():
    base = f"artifacts/1/{RUN_A}/artifacts/checkpoints/"
    manifest = json.dumps({"format": 1, "files": [{"stored_at": "checkpoints/e1/step-0/tok.json"}]}).encode()
    objects = [obj(base + "e1/step-1/manifest.json"), obj(base + "e1/step-1/model.bin"),
               obj(base + "e1/step-0/tok.json"), obj(base + "e1/step-0/model.bin"), obj(base + "step-9/part.bin")]
    files = {base + "e1/step-1/manifest.json": manifest}
    p = plan(objects, catalog(run(RUN_A, lease=lease_tag(held=False))), files=files)
    assert removed(p) == {base + "e1/step-0/model.bin", base + "step-9/part.bin"}
    assert [r.recheck_run for r in p.removals] == [RUN_A]
    # A live lease, no lease at all (not a trainer's run), or an unreadable manifest: untouched.
    for r in (run(RUN_A, status="RUNNING", lease=lease_tag(held=True)), run(RUN_A, lease=None)):
        assert plan(objects, catalog(r), files=files).removals == []
    p = plan(objects, catalog(run(RUN_A, lease=lease_tag(held=False))), files={base + "e1/step-1/manifest.json": b"{"})
    assert p.removals == [] and any("unreadable manifest" in k for k in p.kept)


def test_pending_uploads_of_live_runs_stay():
    key = f"artifacts/1/{RUN_A}/artifacts/checkpoints/step-1/model.bin"
    uploads = [PendingUpload(key, "u1", OLD, 100)]
    assert plan([], catalog(run(RUN_A, status="RUNNING", lease=lease_tag(held=True))), uploads).removals == []
    assert plan([], catalog(run(RUN_A, status="RUNNING")), uploads).removals == []  # no lease: can't tell
    p = plan([], catalog(run(RUN_A, status="RUNNING", lease=lease_tag(held=False))), uploads)
    assert [u.upload_id for r in p.removals for u in r.uploads] == ["u1"]
    p = plan([], catalog(run(RUN_A, lease=lease_tag(held=False))), [PendingUpload(key, "u2", NOW - DAY, 1)])
    assert p.removals == []


def test_orphans_by_layout_and_unknown_layouts_kept():
    objects = [obj(f"artifacts/1/{RUN_B}/artifacts/x"), obj("artifacts/7/anything"), obj("artifacts/1/models/m-9/a/b"),
               obj("artifacts/1/traces/tr-1/artifacts/t.json"), obj("elsewhere/file"), obj(f"artifacts/1/{RUN_A}/y")]
    p = plan(objects, catalog(run(RUN_A)))
    assert {r.ident for r in p.removals} == {f"run {RUN_B}", "experiment 7", "logged model m-9"}
    # The trace, the key outside artifacts/, and one beside (not in) an existing run's artifact folder.
    assert p.unrecognised == 3
