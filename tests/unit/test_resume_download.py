"""download_checkpoint against MLflow's local-folder artifact store: which checksum a manifest
entry is checked by, and what a mismatch says."""

import dataclasses

import pytest
from mltrainer.manifest import build_manifest
from mltrainer.resume import download_checkpoint
from mltrainer.transfer import RunArtifacts

STORE_PATH = "checkpoints/step-00000004"


@pytest.fixture
def stored(tmp_path):
    """A two-file checkpoint uploaded to a local artifact store, and its manifest."""
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 400)
    (folder / "config.json").write_bytes(b'{"hidden": 32}')
    store = RunArtifacts.for_artifact_uri((tmp_path / "artifacts").as_uri())
    manifest = build_manifest(folder, step=4, metrics={}, store_path=STORE_PATH)
    for entry in manifest.files:
        store.log_artifact(str(folder / entry.path), STORE_PATH)
    return store, manifest, tmp_path / "artifacts" / STORE_PATH


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_checkpoint_downloads_whole(stored, tmp_path):
    store, manifest, _ = stored
    dest = tmp_path / "restored"
    assert download_checkpoint(store, manifest, dest) is None
    assert (dest / "model.safetensors").read_bytes() == bytes(range(256)) * 400
    assert (dest / "config.json").read_bytes() == b'{"hidden": 32}'


def test_same_size_corruption_is_caught_by_crc32(stored, tmp_path):
    store, manifest, objects = stored
    flip_last_byte(objects / "model.safetensors")
    dest = tmp_path / "restored"
    problem = download_checkpoint(store, manifest, dest)
    assert problem is not None
    assert f"{STORE_PATH}/model.safetensors does not match its manifest (crc32 " in problem
    assert not dest.exists(), "a checkpoint that failed its check must not be left on disk"


def test_a_manifest_without_crc32_is_checked_by_sha256(stored, tmp_path):
    store, manifest, objects = stored
    old = dataclasses.replace(manifest, files=tuple(dataclasses.replace(e, crc32=None) for e in manifest.files))
    assert download_checkpoint(store, old, tmp_path / "first") is None
    flip_last_byte(objects / "model.safetensors")
    problem = download_checkpoint(store, old, tmp_path / "restored")
    assert problem is not None and "does not match its manifest (sha256 " in problem


def test_unknown_checksum_is_refused_before_anything_moves(stored, tmp_path):
    store, _, _ = stored
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        store.download_file(f"{STORE_PATH}/config.json", tmp_path / "x", checksum="md5")
    assert not (tmp_path / "x").exists()
