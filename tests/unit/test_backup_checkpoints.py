"""The backup's checkpoint rule (mlstack.backup.checkpoints) against manifests the trainer writes.

Pure logic: the manifests are built by mltrainer.manifest itself, so the backup's reader and the
trainer's writer are held to one format.
"""

from __future__ import annotations

import hashlib

from mlstack.backup.bucket import StoredObject
from mlstack.backup.checkpoints import incomplete_manifests
from mltrainer.manifest import MANIFEST_NAME, build_manifest

ROOT = "artifacts/1/0123456789abcdef0123456789abcdef/artifacts/"


def _checkpoint(tmp_path, name: str, files: dict[str, bytes], stored_digests=None):
    folder = tmp_path / name
    folder.mkdir()
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    manifest = build_manifest(folder, step=4, metrics={"loss": 1.0}, store_path=f"checkpoints/{name}",
                              stored_digests=stored_digests)
    return manifest


def _objects(manifest, files: dict[str, bytes], skip: set[str] = frozenset(), alter: set[str] = frozenset()):
    """The backup's objects of one stored checkpoint: its own files (some left out or altered) and its manifest."""
    held = {}
    for entry in manifest.files_to_upload():
        if entry.path in skip:
            continue
        data = files[entry.path] + (b"!" if entry.path in alter else b"")
        held[ROOT + entry.stored_at] = data
    held[ROOT + manifest.store_path + "/" + MANIFEST_NAME] = manifest.to_json().encode()
    return held


def _judge(held: dict[str, bytes]):
    objects = [StoredObject(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in held.items()]
    return {d.key: d.reason for d in incomplete_manifests(objects, lambda o: held[o.key])}


FILES = {"model.safetensors": b"w" * 1000, "config.json": b"{}"}


def test_a_whole_checkpoint_keeps_its_manifest(tmp_path):
    manifest = _checkpoint(tmp_path, "step-00000004", FILES)
    assert _judge(_objects(manifest, FILES)) == {}


def test_a_missing_file_drops_the_manifest(tmp_path):
    manifest = _checkpoint(tmp_path, "step-00000004", FILES)
    dropped = _judge(_objects(manifest, FILES, skip={"model.safetensors"}))
    key = ROOT + "checkpoints/step-00000004/manifest.json"
    assert list(dropped) == [key]
    assert "checkpoints/step-00000004/model.safetensors is not in the backup" in dropped[key]


def test_a_file_with_other_bytes_of_another_size_drops_the_manifest(tmp_path):
    manifest = _checkpoint(tmp_path, "step-00000004", FILES)
    dropped = _judge(_objects(manifest, FILES, alter={"config.json"}))
    assert "is not the file the manifest lists" in dropped[ROOT + "checkpoints/step-00000004/manifest.json"]


def test_same_size_other_bytes_drops_the_manifest(tmp_path):
    manifest = _checkpoint(tmp_path, "step-00000004", FILES)
    held = _objects(manifest, FILES)
    held[ROOT + "checkpoints/step-00000004/model.safetensors"] = b"x" * 1000
    assert list(_judge(held)) == [ROOT + "checkpoints/step-00000004/manifest.json"]


def test_a_deduplicated_file_is_looked_up_in_the_checkpoint_that_stores_it(tmp_path):
    first = _checkpoint(tmp_path, "step-00000004", FILES)
    second_files = {"model.safetensors": b"v" * 1000, "config.json": b"{}"}
    second = _checkpoint(tmp_path, "step-00000008", second_files, stored_digests=first.digest_index())
    assert any(e.stored_at.startswith("checkpoints/step-00000004/") for e in second.files)  # config.json reused
    both = {**_objects(first, FILES), **_objects(second, second_files)}
    assert _judge(both) == {}
    # The older checkpoint's own config.json gone (evicted while the backup ran): both manifests go.
    del both[ROOT + "checkpoints/step-00000004/config.json"]
    assert set(_judge(both)) == {ROOT + "checkpoints/step-00000004/manifest.json",
                                 ROOT + "checkpoints/step-00000008/manifest.json"}


def test_a_manifest_stored_elsewhere_than_its_store_path_is_dropped(tmp_path):
    manifest = _checkpoint(tmp_path, "step-00000004", FILES)
    held = _objects(manifest, FILES)
    held[ROOT + "checkpoints/copy/manifest.json"] = held[ROOT + "checkpoints/step-00000004/manifest.json"]
    assert "is not the folder it is stored in" in _judge(held)[ROOT + "checkpoints/copy/manifest.json"]


def test_other_objects_named_manifest_json_are_kept(tmp_path):
    held = {ROOT + "data/manifest.json": b'{"rows": 3}', ROOT + "notes/manifest.json": b"not json"}
    assert _judge(held) == {}
