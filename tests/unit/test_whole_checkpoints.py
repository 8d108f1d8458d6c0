"""Every checkpoint folder is whole, eviction removes it whole, and runs of the earlier layout
(manifests pointing into older folders through ``stored_at``) still evict without losing a kept
checkpoint's bytes or leaving orphans. Fake store: the real one is in
tests/integration/test_logged_checkpoints.py.
"""

from __future__ import annotations

from pathlib import Path

from test_uploader import FakeStore, make_job

from mltrainer.manifest import MANIFEST_NAME, Manifest, build_manifest, file_digest
from mltrainer.policy import CheckpointPolicy, RetentionState
from mltrainer.uploader import CheckpointUploader

KEEP_LAST = CheckpointPolicy(upload="last")
STEP = "checkpoints/step-{:08d}".format


def folder_of(store: FakeStore, path: str) -> dict[str, bytes]:
    return {k[len(path) + 1:]: v for k, v in store.objects.items() if k.startswith(path + "/")}


def test_eviction_removes_the_whole_folder_even_objects_its_manifest_does_not_list(tmp_path):
    store = FakeStore()
    store.objects[f"{STEP(1)}/stray.bin"] = b"left by a process that died mid-upload"
    up = CheckpointUploader(store, KEEP_LAST)
    up.submit(make_job(tmp_path, 1))
    up.submit(make_job(tmp_path, 2))
    up.close(progress=False)
    assert folder_of(store, STEP(1)) == {}
    assert set(folder_of(store, STEP(2))) == {"config.json", "model.safetensors", MANIFEST_NAME}


def test_a_server_that_makes_no_copies_gets_the_bytes(tmp_path):
    store = FakeStore(copies=False)
    up = CheckpointUploader(store, CheckpointPolicy())
    up.submit(make_job(tmp_path, 1))
    up.submit(make_job(tmp_path, 2))
    up.close(progress=False)
    assert store.copied == [(f"{STEP(1)}/config.json", f"{STEP(2)}/config.json")]  # asked, refused
    assert f"{STEP(2)}/config.json" in store.calls  # then sent
    assert set(folder_of(store, STEP(2))) == {"config.json", "model.safetensors", MANIFEST_NAME}
    assert up.stats.deduplicated_bytes == 0


def test_a_copy_source_deleted_behind_the_uploaders_back_is_sent_instead(tmp_path):
    store = FakeStore()
    up = CheckpointUploader(store, CheckpointPolicy())
    up.submit(make_job(tmp_path, 1))
    up.close(progress=False)
    del store.objects[f"{STEP(1)}/config.json"]
    up2 = CheckpointUploader(store, CheckpointPolicy(), max_retries=3, backoff_seconds=5)
    up2.adopt([Manifest.from_dict(m) for m in store.manifests().values()])
    up2.submit(make_job(tmp_path, 2))
    up2.close(progress=False)  # a 404 is final: no retries with backoff (5 s each), straight to the upload
    assert store.objects[f"{STEP(2)}/config.json"] == b'{"same": "every step"}'


def old_layout_run(tmp_path: Path, store: FakeStore) -> tuple[Manifest, Manifest]:
    """Steps 1 and 2 as the earlier layout stored them: step 2's config.json only in step 1's folder."""
    manifests = []
    digests: dict[str, str] = {}
    for step in (1, 2):
        job = make_job(tmp_path, step)
        manifest = build_manifest(job.snapshot, step=step, metrics=job.metrics, store_path=job.store_path,
                                  stored_digests=digests)
        for entry in manifest.files_to_upload():
            store.objects[entry.stored_at] = (job.snapshot / entry.path).read_bytes()
        store.objects[f"{job.store_path}/{MANIFEST_NAME}"] = manifest.to_json().encode()
        digests.update(manifest.digest_index())
        manifests.append(manifest)
    assert {e.path: e.stored_at for e in manifests[1].files}["config.json"] == f"{STEP(1)}/config.json"
    return manifests[0], manifests[1]


def resumed_uploader(store, policy, manifests) -> CheckpointUploader:
    state = RetentionState()
    for m in manifests:
        state.record_stored(m.store_path, m.step, m.metrics)
    up = CheckpointUploader(store, policy, retention=state)
    up.adopt(manifests)
    return up


def test_an_old_layout_folder_keeps_the_files_a_kept_checkpoint_still_lists(tmp_path):
    store = FakeStore()
    first, second = old_layout_run(tmp_path, store)
    up = resumed_uploader(store, CheckpointPolicy(save_last_k=2), [first, second])
    (tmp_path / "new").mkdir()
    up.submit(make_job(tmp_path / "new", 3))
    up.close(progress=False)
    # Step 1 is evicted, but step 2's manifest still lists step 1's config.json: only that stays.
    assert folder_of(store, STEP(1)) == {"config.json": b'{"same": "every step"}'}
    assert set(folder_of(store, STEP(3))) == {"config.json", "model.safetensors", MANIFEST_NAME}  # whole


def test_evicting_an_old_layout_checkpoint_also_removes_what_it_listed_in_an_evicted_folder(tmp_path):
    store = FakeStore()
    _first, second = old_layout_run(tmp_path, store)
    del store.objects[f"{STEP(1)}/{MANIFEST_NAME}"]  # step 1 was evicted; its config.json stayed for step 2
    del store.objects[f"{STEP(1)}/model.safetensors"]
    up = resumed_uploader(store, KEEP_LAST, [second])
    (tmp_path / "new").mkdir()
    job = make_job(tmp_path / "new", 3)
    up.submit(job)
    up.close(progress=False)
    # Step 3 copied its config.json from step 1's folder, then step 2 was evicted: nothing else is left.
    assert store.copied == [(f"{STEP(1)}/config.json", f"{STEP(3)}/config.json")]
    assert set(store.objects) == {f"{STEP(3)}/{n}" for n in ("config.json", "model.safetensors", MANIFEST_NAME)}
    manifest = Manifest.from_json(store.objects[f"{STEP(3)}/{MANIFEST_NAME}"])
    assert all(e.stored_at.startswith(STEP(3) + "/") for e in manifest.files)
    assert {e.path: e.sha256 for e in manifest.files}["config.json"] == \
        file_digest(job.snapshot.parent.parent / "checkpoint-3" / "config.json").sha256
