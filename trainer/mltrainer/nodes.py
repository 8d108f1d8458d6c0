"""Training on several nodes without a shared disk: whose checkpoint files go to the store, and
how the main process learns they are there before it writes the manifest.

Under torchrun each node writes its part of a checkpoint into its own output directory. What
transformers (5.x) writes where, for ``--nnodes 2 --nproc_per_node 1`` (measured; see README):

- ``save_on_each_node`` false: node 0 (global rank 0) writes the whole checkpoint and its
  ``rng_state_0.pth``; every other rank writes only its ``rng_state_<rank>.pth``, into its own
  node's folder. A resume needs every rank's RNG file, so node 1's file belongs in the checkpoint.
- ``save_on_each_node`` true: each node's local rank 0 also writes optimizer, scheduler,
  tokenizer files, ``trainer_state.json`` and ``training_args.bin`` (the last two differ from
  node 0's: they hold the node's own output path and ``is_world_process_zero``); the weights and
  model config are still written by global rank 0 only.
- Sharded states (FSDP ``SHARDED_STATE_DICT``, DeepSpeed) are rank-local files by name too.

So a file is owned by the lowest node that has it (node 0's copy is the canonical one, and node 0
is the main process that writes the manifest), and every other node stores only the files no
lower node has. At each save every rank meets in one barrier and one gather of the node leaders'
file lists (:meth:`NodeGroup.share_checkpoint`); everything after that runs in background
threads, and the nodes tell the main process their files are stored through the key-value store
torchrun's rendezvous already runs (:class:`NodeReports`): a collective from a background thread
would interleave with the training's own collectives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mltrainer.errors import MltrainerError
from mltrainer.manifest import FileDigest, iter_checkpoint_files

logger = logging.getLogger(__name__)

# How long the main process waits for another node to say its files of a checkpoint are stored.
# A node that fails says so at once (its report carries the error), and a node that dies takes
# the whole torchrun job down; this only bounds a node that hangs. Uploads of sharded states of a
# large model can take many minutes, so the bound is generous.
NODE_REPORT_TIMEOUT_S = 3600.0
REPORT_POLL_S = 0.2
# Once training ended with an error the wait is cut to this: a node that died (a killed machine
# ends the job through a failed collective) never reports, and its checkpoint stays incomplete
# after this long rather than holding the main process for the full bound. A live node reports
# sooner: it still stores what it had queued.
REPORT_GRACE_AFTER_ERROR_S = 60.0
# Key prefix in the rendezvous store, next to torch's own keys.
REPORT_PREFIX = "mltrainer/checkpoint-files"


class NodeFilesError(MltrainerError):
    """Another node's files of a checkpoint are not in the store: its manifest is not written."""

    label = "upload error"


@dataclass(frozen=True)
class Topology:
    """This process's place in the training: global rank, node, and rank on its node (torchrun's variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Topology:
        env = os.environ if env is None else env
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
        # torchrun names the node GROUP_RANK; other launchers that set only LOCAL_WORLD_SIZE place
        # ranks node by node, as torchrun does.
        node = int(env["GROUP_RANK"]) if "GROUP_RANK" in env else rank // max(1, local_world)
        return cls(rank=rank, world_size=world, local_rank=local_rank, node=node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        """The one process per node that reads the node's folder and stores its files."""
        return self.local_rank == 0


def assign_files(listings: Iterable[tuple[int, Iterable[str]]]) -> dict[int, list[str]]:
    """``(node, files in its checkpoint folder)`` of each node leader -> the files each node stores.

    A file is stored by the lowest node that has it; node 0 (the main process) first.
    """
    owner: dict[str, int] = {}
    for node, files in sorted(listings, key=lambda item: item[0]):
        for rel in files:
            owner.setdefault(rel, node)
    out: dict[int, list[str]] = {}
    for rel, node in sorted(owner.items()):
        out.setdefault(node, []).append(rel)
    return out


def report_key(store_path: str, node: int) -> str:
    # A torchrun restart (--max-restarts) reruns the training against the same store: its
    # reports must not be taken for the previous attempt's.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{REPORT_PREFIX}/{attempt}/{store_path}/node-{node}"


class NodeReports:
    """A node says "my files of checkpoint X are stored (with these digests)" or "they failed";
    the main process waits for it. Carried by the rendezvous store every torchrun rank reaches.

    Waiting polls ``check`` instead of calling the store's blocking ``wait``: a blocking call
    holds the store client's lock, which the training thread's collectives may need.
    """

    def __init__(self, store=None):
        self._store = store
        self._give_up_at = float("inf")  # monotonic time; set by hurry()

    @property
    def store(self):
        if self._store is None:
            # torch.distributed keeps the store it was initialised with; it is the only store
            # every node reaches without another open port.
            from torch.distributed import distributed_c10d

            self._store = distributed_c10d._get_default_store()
        return self._store

    def stored(self, store_path: str, node: int, digests: dict[str, FileDigest]) -> None:
        files = {rel: {"size": d.size, "sha256": d.sha256, "crc32": d.crc32} for rel, d in digests.items()}
        self.store.set(report_key(store_path, node), json.dumps({"files": files}))

    def failed(self, store_path: str, node: int, error: str) -> None:
        self.store.set(report_key(store_path, node), json.dumps({"error": error}))

    def hurry(self, grace: float = REPORT_GRACE_AFTER_ERROR_S) -> None:
        """Training ended with an error: from now on wait at most ``grace`` seconds for any report."""
        self._give_up_at = min(self._give_up_at, time.monotonic() + grace)

    def wait(self, store_path: str, node: int, files: list[str],
             timeout: float = NODE_REPORT_TIMEOUT_S) -> dict[str, FileDigest]:
        """The digests node ``node`` reports for ``files`` of ``store_path``; raises
        :class:`NodeFilesError` when it reports a failure, reports other files, or says nothing
        within ``timeout`` seconds (or the grace :meth:`hurry` set)."""
        key = report_key(store_path, node)
        deadline = time.monotonic() + timeout
        while not self.store.check([key]):
            now = time.monotonic()
            if now > deadline or now > self._give_up_at:
                why = f"within {timeout:.0f}s" if now > deadline else "before training, which ended with an error, stopped waiting"
                raise NodeFilesError(f"{store_path}: node {node} did not report its files ({', '.join(files)}) "
                                     f"{why}; manifest not stored")
            time.sleep(REPORT_POLL_S)
        report = json.loads(self.store.get(key))
        if "error" in report:
            raise NodeFilesError(f"{store_path}: node {node} could not store its files ({', '.join(files)}): "
                                 f"{report['error']}; manifest not stored")
        got = {rel: FileDigest(sha256=d["sha256"], crc32=d["crc32"], size=d["size"])
               for rel, d in report["files"].items()}
        if set(got) != set(files):
            raise NodeFilesError(f"{store_path}: node {node} reported {sorted(got)}, expected {sorted(files)}; "
                                 f"manifest not stored")
        return got


@dataclass(frozen=True)
class OtherNodesFiles:
    """The files of one checkpoint that other nodes store, and how to learn they did."""

    store_path: str
    files: dict[int, list[str]]  # node -> relative paths it stores
    reports: NodeReports

    def collect(self) -> dict[str, FileDigest]:
        """Every other node's digests, once each says its files are stored (raises if one does not)."""
        out: dict[str, FileDigest] = {}
        for node, files in sorted(self.files.items()):
            out.update(self.reports.wait(self.store_path, node, files))
        return out


@dataclass(frozen=True)
class CheckpointShare:
    """What one save became across the nodes: where it is stored and who stores which file."""

    store_path: str
    files: dict[int, list[str]]  # node -> relative paths it stores


class NodeGroup:
    """This process among the training's processes: the collective step of every save."""

    def __init__(self, topology: Topology, reports: NodeReports | None = None):
        self.topology = topology
        self.reports = reports or NodeReports()

    @classmethod
    def if_distributed(cls) -> NodeGroup | None:
        """The group when this process is one of several (torch.distributed initialised), else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(Topology.from_env())

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank (a collective: all ranks call it)."""
        import torch.distributed as dist

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered

    def share_checkpoint(self, local_dir: Path, store_path: str | None) -> CheckpointShare | None:
        """Called by every rank after each save, in the same order; ``store_path`` is the main
        process's decision (None: this save is not stored) and is ignored elsewhere.

        The barrier comes first: a node leader lists its folder only once every rank of its node
        has written its files there (ranks leave ``_save_checkpoint`` at different times).
        """
        import torch.distributed as dist

        dist.barrier()
        me = self.topology
        listing = None
        if me.is_node_leader and local_dir.is_dir():
            listing = [rel for rel, _ in iter_checkpoint_files(local_dir)]
        gathered = self.gather((store_path if me.is_main else None, me.node, listing))
        decided = gathered[0][0]
        if decided is None:
            return None
        return CheckpointShare(decided, assign_files((node, files) for _, node, files in gathered
                                                     if files is not None))
