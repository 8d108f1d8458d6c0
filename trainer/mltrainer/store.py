"""Reading a run's checkpoints back from the store: listing, completeness, aliases."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mltrainer import tracking
from mltrainer.manifest import MANIFEST_NAME, Manifest
from mltrainer.naming import DEFAULT_ROOT


@dataclass
class CheckpointInfo:
    store_path: str
    complete: bool
    step: int | None
    total_bytes: int | None
    metrics: dict
    aliases: list[str]
    problem: str | None = None
    evicted: bool = False


def list_checkpoints(client, run_id: str, root: str = DEFAULT_ROOT) -> list[CheckpointInfo]:
    run = client.get_run(run_id)  # raises a clear MlflowException for an unknown id
    tags = run.data.tags
    aliases = {tracking.TAG_LATEST: "latest", tracking.TAG_BEST: "best"}
    out = []
    manifests: list[Manifest] = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in client.list_artifacts(run_id, root):
            if not entry.is_dir:
                continue
            names = [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, entry.path)]
            info = CheckpointInfo(entry.path, False, None, None, {}, [
                alias for tag, alias in aliases.items() if tags.get(tag) == entry.path
            ])
            if MANIFEST_NAME in names:
                try:
                    local = client.download_artifacts(run_id, f"{entry.path}/{MANIFEST_NAME}", tmp)
                    manifest = Manifest.from_json(Path(local).read_bytes())
                    info.complete, info.step, info.total_bytes = True, manifest.step, manifest.total_bytes
                    info.metrics = manifest.metrics
                    manifests.append(manifest)
                except ValueError as exc:
                    info.problem = f"unreadable manifest: {exc}"
            else:
                info.problem = "no manifest (upload incomplete)"
            out.append(info)
    # Retention deletes an evicted checkpoint's manifest and its own files, but files that kept
    # checkpoints point at (dedup) stay where they were first stored: such a folder is not a
    # checkpoint any more, only storage for the ones that reference it.
    referenced = {e.stored_at.rsplit("/", 1)[0] for m in manifests for e in m.files}
    for info in out:
        if not info.complete and info.store_path in referenced:
            info.problem = "evicted; holds files shared with kept checkpoints"
            info.evicted = True
    return sorted(out, key=lambda c: (c.step is None, c.step or 0, c.store_path))


def format_table(rows: list[CheckpointInfo]) -> str:
    lines = [f"{'step':>8}  {'size':>10}  {'state':<10}  {'aliases':<12}  path"]
    for c in rows:
        size = f"{c.total_bytes / 1e6:.1f} MB" if c.total_bytes is not None else "-"
        state = "complete" if c.complete else ("evicted" if c.evicted else "INCOMPLETE")
        lines.append(f"{c.step if c.step is not None else '-':>8}  {size:>10}  {state:<10}  "
                     f"{','.join(c.aliases) or '-':<12}  {c.store_path}" + (f"  ({c.problem})" if c.problem else ""))
    return "\n".join(lines)
