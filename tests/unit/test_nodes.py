"""Multi-node checkpoints: who stores which file, how nodes report, and a manifest that waits for them.

The reports go through a real torch TCPStore (in this process, on loopback); the artifact store
is the in-memory one of test_uploader. Two real torchrun nodes: tests/integration/test_trainer_multinode.py.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore
from test_uploader import KEEP_ALL, FakeStore, make_job

from mltrainer.manifest import file_digest
from mltrainer.node_upload import NodeFilesUploader, NodeJob
from mltrainer.nodes import NodeFilesError, NodeReports, OtherNodesFiles, Topology, assign_files
from mltrainer.uploader import CheckpointUploader, UploadError


class ListingStore(FakeStore):
    """FakeStore that also lists a folder, as RunArtifacts does (entries with path, is_dir, file_size)."""

    def list_artifacts(self, path=None):
        from types import SimpleNamespace

        prefix = f"{path}/" if path else ""
        with self.lock:
            return [SimpleNamespace(path=k, is_dir=False, file_size=len(v)) for k, v in self.objects.items()
                    if k.startswith(prefix) and "/" not in k[len(prefix):]]


@pytest.fixture
def reports():
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    yield NodeReports(store)


def test_each_file_is_stored_by_the_lowest_node_that_has_it():
    # save_on_each_node: node 1 also has optimizer.pt (node 0's copy is the one stored); its RNG file only it has.
    assert assign_files([(1, ["optimizer.pt", "rng_state_1.pth", "rng_state_2.pth"]),
                         (0, ["model.safetensors", "optimizer.pt", "rng_state_0.pth"]),
                         (2, ["rng_state_2.pth", "shards/rank2.pt"])]) == {
        0: ["model.safetensors", "optimizer.pt", "rng_state_0.pth"],
        1: ["rng_state_1.pth", "rng_state_2.pth"],
        2: ["shards/rank2.pt"],
    }
    assert assign_files([(0, ["a"]), (1, ["a"])]) == {0: ["a"]}  # nothing left for node 1


def test_topology_from_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert Topology.from_env(env) == Topology(rank=3, world_size=4, local_rank=1, node=1)
    assert not Topology.from_env(env).is_node_leader
    no_group = {k: v for k, v in env.items() if k != "GROUP_RANK"}
    assert Topology.from_env(no_group).node == 1  # ranks placed node by node
    assert Topology.from_env({}) == Topology() and Topology().is_main and Topology().is_node_leader


def test_a_report_carries_digests_or_the_error(reports, tmp_path):
    f = tmp_path / "rng_state_1.pth"
    f.write_bytes(b"rng")
    reports.stored("checkpoints/step-4", 1, {"rng_state_1.pth": file_digest(f)})
    assert reports.wait("checkpoints/step-4", 1, ["rng_state_1.pth"], timeout=1) == {
        "rng_state_1.pth": file_digest(f)}
    with pytest.raises(NodeFilesError, match=r"node 1 reported \['rng_state_1.pth'\], expected \['other.pt'\]"):
        reports.wait("checkpoints/step-4", 1, ["other.pt"], timeout=1)
    reports.failed("checkpoints/step-8", 1, "ConnectionError: S3 unreachable")
    with pytest.raises(NodeFilesError, match=r"step-8: node 1 could not store its files \(rng_state_1.pth\): "
                                             r"ConnectionError: S3 unreachable; manifest not stored"):
        reports.wait("checkpoints/step-8", 1, ["rng_state_1.pth"], timeout=1)
    with pytest.raises(NodeFilesError, match=r"node 2 did not report its files \(x.pt\) within 0s"):
        reports.wait("checkpoints/step-8", 2, ["x.pt"], timeout=0.3)


def node_job(tmp_path: Path, step: int, payload: bytes) -> NodeJob:
    local = tmp_path / "node1" / f"checkpoint-{step}"
    local.mkdir(parents=True)
    (local / "rng_state_1.pth").write_bytes(payload)
    return NodeJob(local, local, f"checkpoints/step-{step:08d}", ["rng_state_1.pth"])


def test_the_manifest_waits_for_the_other_node_and_lists_its_file(reports, tmp_path):
    store = ListingStore()
    main = CheckpointUploader(store, KEEP_ALL, max_retries=0)
    job = make_job(tmp_path, 4)
    job.other_nodes = OtherNodesFiles(job.store_path, {1: ["rng_state_1.pth"]}, reports)
    main.submit(job)
    node = NodeFilesUploader(store, reports, 1, max_retries=0)
    threading.Timer(0.5, lambda: node.submit(node_job(tmp_path, 4, b"node 1 rng"))).start()
    main.close(progress=False)  # returns once node 1 reported
    node.close()
    manifest = store.manifests()["checkpoints/step-00000004"]
    assert [e["path"] for e in manifest["files"]] == ["config.json", "model.safetensors", "rng_state_1.pth"]
    entry = manifest["files"][2]
    assert entry["stored_at"] == "checkpoints/step-00000004/rng_state_1.pth"
    assert store.objects[entry["stored_at"]] == b"node 1 rng"


def test_no_manifest_when_a_node_says_stored_but_the_store_has_no_such_object(reports, tmp_path):
    store = ListingStore()
    main = CheckpointUploader(store, KEEP_ALL, max_retries=0)
    job = make_job(tmp_path, 4)
    job.other_nodes = OtherNodesFiles(job.store_path, {1: ["rng_state_1.pth"]}, reports)
    lying = node_job(tmp_path, 4, b"never sent")
    reports.stored(job.store_path, 1, {"rng_state_1.pth": file_digest(lying.snapshot / "rng_state_1.pth")})
    main.submit(job)
    with pytest.raises(UploadError, match=r"not in the store \(node 1: checkpoints/step-00000004/rng_state_1.pth: "
                                          r"missing"):
        main.close(progress=False)
    assert store.manifests() == {}


def test_a_node_whose_upload_fails_tells_the_main_process_and_raises_at_close(reports, tmp_path):
    store = FakeStore(always_fail=True)
    node = NodeFilesUploader(store, reports, 1, max_retries=0)
    job = node_job(tmp_path, 4, b"rng")
    node.submit(job)
    with pytest.raises(UploadError, match=r"checkpoints/step-00000004 \(local copy: .*checkpoint-4\): "
                                          r"ConnectionError: S3 unreachable"):
        node.close()
    with pytest.raises(NodeFilesError, match="node 1 could not store its files .*S3 unreachable"):
        reports.wait(job.store_path, 1, ["rng_state_1.pth"], timeout=1)


def test_after_an_error_the_main_process_stops_waiting_for_a_node_that_never_reports(reports, tmp_path):
    import time

    store = ListingStore()
    main = CheckpointUploader(store, KEEP_ALL, max_retries=0)
    job = make_job(tmp_path, 4)
    job.other_nodes = OtherNodesFiles(job.store_path, {1: ["rng_state_1.pth"]}, reports)
    main.submit(job)  # node 1 died: no report comes
    reports.hurry(0.5)  # what end_after_error does, with the grace cut short for the test
    started = time.monotonic()
    not_stored = main.end_after_error(RuntimeError("gloo: connection closed by peer"))
    assert time.monotonic() - started < 5
    assert [path for path, _ in not_stored] == ["checkpoints/step-00000004"]
    assert store.manifests() == {}
