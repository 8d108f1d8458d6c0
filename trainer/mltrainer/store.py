"""Reading a run's checkpoints back from the store: listing, completeness, aliases."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mltrainer import tracking
from mltrainer.manifest import MANIFEST_NAME, Manifest
from mltrainer.naming import DEFAULT_ROOT
from mltrainer.transfer import RunArtifacts

SCAN_CONCURRENCY = 8


@dataclass
class ScannedCheckpoint:
    store_path: str
    manifest: Manifest | None  # None: not complete (no manifest, or an unreadable one)
    problem: str | None = None


def scan(client, run_id: str, root: str = DEFAULT_ROOT, store: RunArtifacts | None = None) -> list[ScannedCheckpoint]:
    """Every checkpoint folder of the run with its manifest, when it has a readable one.

    Folders with no objects left (some S3 servers keep empty "directories" after a delete) are
    not checkpoints and are left out. Folders are read side by side: each costs two round trips
    (its listing, its manifest), which for a run with many checkpoints added up to seconds.
    """
    store = store or RunArtifacts.of_run(client, run_id)

    def read(path: str) -> ScannedCheckpoint | None:
        names = {a.path.rsplit("/", 1)[-1] for a in store.list_artifacts(path)}
        if not names:
            return None
        if MANIFEST_NAME not in names:
            return ScannedCheckpoint(path, None, "no manifest: its upload never finished")
        try:
            return ScannedCheckpoint(path, Manifest.from_json(store.read_bytes(f"{path}/{MANIFEST_NAME}")))
        except ValueError as exc:
            return ScannedCheckpoint(path, None, f"unreadable manifest: {exc}")

    folders = [entry.path for entry in store.list_artifacts(root) if entry.is_dir]
    with ThreadPoolExecutor(max_workers=SCAN_CONCURRENCY, thread_name_prefix="scan") as pool:
        return [found for found in pool.map(read, folders) if found is not None]


@dataclass
class CheckpointInfo:
    store_path: str
    state: str  # complete | incomplete | evicted
    step: int | None
    total_bytes: int | None
    metrics: dict
    aliases: list[str]
    problem: str | None = None


def list_checkpoints(client, run_id: str, root: str = DEFAULT_ROOT) -> list[CheckpointInfo]:
    tags = client.get_run(run_id).data.tags  # raises a clear MlflowException for an unknown id
    aliases = {tracking.TAG_LATEST: "latest", tracking.TAG_BEST: "best"}
    scanned = scan(client, run_id, root)
    # Retention deletes an evicted checkpoint's manifest and its own files, but files that kept
    # checkpoints point at (dedup) stay where they were first stored: such a folder is not a
    # checkpoint any more, only storage for the ones that reference it.
    referenced = [e.stored_at for c in scanned if c.manifest for e in c.manifest.files]
    out = []
    for c in scanned:
        names = [alias for tag, alias in aliases.items() if tags.get(tag) == c.store_path]
        if c.manifest is not None:
            m = c.manifest
            out.append(CheckpointInfo(c.store_path, "complete", m.step, m.total_bytes, m.metrics, names))
        elif any(p.startswith(c.store_path + "/") for p in referenced):
            out.append(CheckpointInfo(c.store_path, "evicted", None, None, {}, names,
                                      "holds files shared with kept checkpoints"))
        else:
            out.append(CheckpointInfo(c.store_path, "incomplete", None, None, {}, names, c.problem))
    return sorted(out, key=lambda c: (c.step is None, c.step or 0, c.store_path))


def format_table(rows: list[CheckpointInfo]) -> str:
    lines = [f"{'step':>8}  {'size':>10}  {'state':<10}  {'aliases':<12}  path"]
    for c in rows:
        size = f"{c.total_bytes / 1e6:.1f} MB" if c.total_bytes is not None else "-"
        step = c.step if c.step is not None else "-"
        lines.append(f"{step:>8}  {size:>10}  {c.state:<10}  {','.join(c.aliases) or '-':<12}  {c.store_path}"
                     + (f"  ({c.problem})" if c.problem else ""))
    return "\n".join(lines)
