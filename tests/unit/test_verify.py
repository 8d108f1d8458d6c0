from types import SimpleNamespace

from mltrainer.manifest import Manifest, ManifestEntry
from mltrainer.store import CheckpointInfo, format_table
from mltrainer.verify import object_problems

SHA = "0" * 64


class ListingStore:
    """A store as ``list_artifacts`` shows it: folder -> {name: size}; counts the listings."""

    def __init__(self, objects: dict[str, int]):
        self.objects = objects
        self.listed: list[str] = []

    def list_artifacts(self, folder):
        self.listed.append(folder)
        return [SimpleNamespace(path=p, is_dir=False, file_size=size) for p, size in self.objects.items()
                if p.rsplit("/", 1)[0] == folder]


def manifest(store_path, files):
    entries = tuple(ManifestEntry(path=rel, size=size, sha256=SHA, stored_at=at) for rel, size, at in files)
    return Manifest(step=1, metrics={}, store_path=store_path, created_at="2026-01-01T00:00:00Z", files=entries)


def test_missing_and_resized_objects_are_named_deduplicated_ones_included():
    a, b = "checkpoints/step-1", "checkpoints/step-2"
    store = ListingStore({f"{a}/model.safetensors": 100, f"{a}/config.json": 10, f"{b}/model.safetensors": 99,
                          f"{a}/sub/x.bin": 5})
    manifests = [
        manifest(a, [("model.safetensors", 100, f"{a}/model.safetensors"), ("config.json", 10, f"{a}/config.json"),
                     ("sub/x.bin", 5, f"{a}/sub/x.bin")]),
        manifest(b, [("model.safetensors", 100, f"{b}/model.safetensors"),
                     ("config.json", 10, f"{a}/config.json"),  # deduplicated: stored under step-1
                     ("optimizer.pt", 7, f"{b}/optimizer.pt")]),
    ]
    problems = object_problems(store, manifests)
    assert problems[a] == []
    assert problems[b] == [f"{b}/model.safetensors: 99 bytes, the manifest lists 100",
                           f"{b}/optimizer.pt: missing (the manifest lists 7 bytes)"]
    assert sorted(store.listed) == [a, f"{a}/sub", b]  # each folder once
    del store.objects[f"{a}/config.json"]
    problems = object_problems(store, manifests)
    missing = f"{a}/config.json: missing (the manifest lists 10 bytes)"
    assert problems[a] == [missing] and missing in problems[b]  # both checkpoints need that object


def test_table_says_what_complete_means():
    rows = [CheckpointInfo("checkpoints/step-1", "complete", 1, 10, {}, ["latest"])]
    plain = format_table(rows)
    assert "complete: its manifest.json is present" in plain and "the files themselves were not checked" in plain
    verified = format_table(rows + [CheckpointInfo("checkpoints/step-2", "damaged", 2, 10, {}, [], "x: missing")],
                            verified=True)
    assert "every file it lists is in the store with the listed size" in verified
    assert "damaged: its manifest.json is present, but a file it lists is missing" in verified
    assert "checkpoints/step-2  (x: missing)" in verified
