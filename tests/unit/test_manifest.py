import hashlib
import json
import os
import zlib
from datetime import datetime, timezone

import pytest
from mltrainer.manifest import MANIFEST_NAME, Manifest, build_manifest, file_digest

STORE = "checkpoints/step-00000020"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "checkpoint-20"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "config.json").write_bytes(b'{"a": 1}')
    (folder / "sub" / "deeper" / "x.bin").write_bytes(b"")
    (folder / "sub" / "tok.json").write_bytes(b"tokens")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not part of the checkpoint")
    os.symlink(outside, folder / "linked_dir")  # skipped
    os.symlink(folder / "config.json", folder / "config_link.json")  # followed
    return folder


def test_build_manifest_lists_files_sorted_with_digests(ckpt):
    m = build_manifest(ckpt, step=20, metrics={"eval_loss": 0.25}, store_path=STORE, stored_digests={}, created_at=WHEN)
    assert [e.path for e in m.files] == [
        "config.json",
        "config_link.json",
        "model.safetensors",
        "sub/deeper/x.bin",
        "sub/tok.json",
    ]
    by_path = {e.path: e for e in m.files}
    assert by_path["model.safetensors"].size == 7000
    assert by_path["model.safetensors"].sha256 == sha(b"weights" * 1000)
    assert by_path["model.safetensors"].crc32 == f"{zlib.crc32(b'weights' * 1000):08x}"
    assert by_path["model.safetensors"].check == ("crc32", by_path["model.safetensors"].crc32)
    assert by_path["config_link.json"].sha256 == sha(b'{"a": 1}')
    assert by_path["sub/deeper/x.bin"].stored_at == f"{STORE}/sub/deeper/x.bin"
    assert m.total_bytes == 7000 + 8 + 8 + 0 + 6
    assert m.created_at == "2025-01-02T03:04:05Z"
    assert len(m.files_to_upload()) == 5


def test_dedup_points_at_existing_object(ckpt):
    previous = "checkpoints/step-00000010/sub/tok.json"
    m = build_manifest(
        ckpt, step=20, metrics={}, store_path=STORE, stored_digests={sha(b"tokens"): previous}, created_at=WHEN
    )
    assert {e.path: e.stored_at for e in m.files}["sub/tok.json"] == previous
    assert [e.path for e in m.files_to_upload()] == [
        "config.json",
        "config_link.json",
        "model.safetensors",
        "sub/deeper/x.bin",
    ]
    assert m.digest_index()[sha(b"tokens")] == previous


def test_json_round_trip(ckpt):
    m = build_manifest(
        ckpt, step=20, metrics={"eval_loss": 0.25, "bad": float("nan")}, store_path=STORE, stored_digests={}
    )
    data = json.loads(m.to_json())
    assert set(data) == {"format", "step", "metrics", "store_path", "created_at", "files", "total_bytes"}
    assert data["format"] == 1 and data["metrics"] == {"eval_loss": 0.25, "bad": None}
    assert set(data["files"][0]) == {"path", "size", "sha256", "crc32", "stored_at"}
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_without_crc32_is_checked_by_sha256():
    """Manifests written before CRC-32 was recorded stay readable; their downloads check sha256."""
    (entry,) = Manifest.from_json(json.dumps(_valid())).files
    assert entry.crc32 is None
    assert entry.check == ("sha256", "0" * 64)
    assert "crc32" not in entry.to_dict()


def _valid():
    return {
        "format": 1,
        "step": 3,
        "metrics": {},
        "store_path": "checkpoints/s3",
        "created_at": "2025-01-01T00:00:00Z",
        "files": [{"path": "a", "size": 1, "sha256": "0" * 64, "stored_at": "checkpoints/s3/a"}],
        "total_bytes": 1,
    }


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(format=2), "unsupported format 2"),
        (lambda d: d.pop("store_path"), "missing field(s) store_path"),
        (lambda d: d.update(step=-1), "'step' must be a non-negative integer"),
        (lambda d: d.update(total_bytes=2), "'total_bytes' is 2 but the files add up to 1"),
        (lambda d: d["files"][0].update(sha256="xyz"), "files[0].sha256"),
        (lambda d: d["files"][0].update(crc32="ABCDEF01"), "files[0].crc32 must be 8 lowercase hex"),
        (lambda d: d["files"][0].update(crc32=12), "files[0].crc32"),
        (lambda d: d["files"][0].update(size=True), "files[0].size"),
        (lambda d: d["files"][0].update(path="../a"), "files[0].path must be a relative path"),
        (lambda d: d["files"].append(dict(d["files"][0])), "listed twice"),
        (lambda d: d.update(metrics={"x": "high"}), "'metrics' must map names to numbers or null"),
    ],
)
def test_from_json_rejects_corruption(mutate, fragment):
    d = _valid()
    Manifest.from_json(json.dumps(d))  # the baseline is valid
    mutate(d)
    with pytest.raises(ValueError) as exc:
        Manifest.from_json(json.dumps(d))
    assert "corrupt manifest" in str(exc.value) and fragment in str(exc.value)


def test_from_json_rejects_non_json():
    with pytest.raises(ValueError, match="corrupt manifest: not valid JSON"):
        Manifest.from_json('{"format": 1,')
    with pytest.raises(ValueError, match="expected a JSON object"):
        Manifest.from_json("[]")


def test_file_digest_streams_large_files(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)
    f = tmp_path / "big"
    f.write_bytes(data)
    got = file_digest(f)
    assert (got.sha256, got.crc32, got.size) == (sha(data), f"{zlib.crc32(data):08x}", len(data))


def test_reserved_name_and_missing_folder(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ValueError, match="reserved name"):
        build_manifest(tmp_path, step=1, metrics={}, store_path="c/s", stored_digests={})
    with pytest.raises(ValueError, match="does not exist"):
        build_manifest(tmp_path / "nope", step=1, metrics={}, store_path="c/s", stored_digests={})
