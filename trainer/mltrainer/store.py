"""Reading a run's checkpoints back from the store: listing, completeness, aliases."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mltrainer import tracking
from mltrainer.manifest import MANIFEST_NAME, Manifest
from mltrainer.naming import DEFAULT_ROOT
from mltrainer.transfer import RunArtifacts
from mltrainer.verify import object_problems

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


# What each state in the listing means, printed under the table: "complete" is a claim about
# the manifest only, unless --verify checked the objects too.
STATE_MEANINGS = {
    "complete": "its manifest.json is present (uploaded last, once every file was stored); "
                "the files themselves were not checked (--verify checks them)",
    "verified complete": "its manifest.json is present, and every file it lists is in the store with the "
                         "listed size (checked by listing; contents are not read, a resume checks their CRC-32)",
    "damaged": "its manifest.json is present, but a file it lists is missing or has another size",
    "incomplete": "no readable manifest.json: its upload never finished, and it is never resumed from",
    "evicted": "deleted by retention; holds files that kept checkpoints still share",
}


@dataclass
class CheckpointInfo:
    store_path: str
    state: str  # complete | damaged (only with verify) | incomplete | evicted
    step: int | None
    total_bytes: int | None
    metrics: dict
    aliases: list[str]
    problem: str | None = None


def list_checkpoints(client, run_id: str, root: str = DEFAULT_ROOT, *, verify: bool = False) -> list[CheckpointInfo]:
    """The run's checkpoints, oldest step first. ``verify``: also check that every object of each
    complete checkpoint is in the store with its manifest's size; one that fails is ``damaged``."""
    tags = client.get_run(run_id).data.tags  # raises a clear MlflowException for an unknown id
    aliases = {tracking.TAG_LATEST: "latest", tracking.TAG_BEST: "best"}
    store = RunArtifacts.of_run(client, run_id)
    scanned = scan(client, run_id, root, store=store)
    damage = object_problems(store, [c.manifest for c in scanned if c.manifest]) if verify else {}
    # Retention deletes an evicted checkpoint's manifest and its own files, but files that kept
    # checkpoints point at (dedup) stay where they were first stored: such a folder is not a
    # checkpoint any more, only storage for the ones that reference it.
    referenced = [e.stored_at for c in scanned if c.manifest for e in c.manifest.files]
    out = []
    for c in scanned:
        names = [alias for tag, alias in aliases.items() if tags.get(tag) == c.store_path]
        if c.manifest is not None:
            m = c.manifest
            problems = damage.get(c.store_path)
            state = "damaged" if problems else "complete"
            out.append(CheckpointInfo(c.store_path, state, m.step, m.total_bytes, m.metrics, names,
                                      "; ".join(problems) if problems else None))
        elif any(p.startswith(c.store_path + "/") for p in referenced):
            out.append(CheckpointInfo(c.store_path, "evicted", None, None, {}, names,
                                      "holds files shared with kept checkpoints"))
        else:
            out.append(CheckpointInfo(c.store_path, "incomplete", None, None, {}, names, c.problem))
    return sorted(out, key=lambda c: (c.step is None, c.step or 0, c.store_path))


def format_table(rows: list[CheckpointInfo], *, verified: bool = False) -> str:
    """The rows as a table, and under it what each state shown means (``verified``: the rows
    come from ``list_checkpoints(verify=True)``)."""
    lines = [f"{'step':>8}  {'size':>10}  {'state':<10}  {'aliases':<12}  path"]
    for c in rows:
        size = f"{c.total_bytes / 1e6:.1f} MB" if c.total_bytes is not None else "-"
        step = c.step if c.step is not None else "-"
        lines.append(f"{step:>8}  {size:>10}  {c.state:<10}  {','.join(c.aliases) or '-':<12}  {c.store_path}"
                     + (f"  ({c.problem})" if c.problem else ""))
    states = {c.state for c in rows} | {"complete"}
    lines.append("")
    for state in ("complete", "damaged", "incomplete", "evicted"):
        if state in states:
            meaning = STATE_MEANINGS["verified complete" if state == "complete" and verified else state]
            lines.append(f"{state}: {meaning}")
    return "\n".join(lines)
