"""Are a complete checkpoint's objects really in the store? (``mltrainer checkpoints --verify``)

"Complete" means the checkpoint's manifest is present: the uploader writes it last, once every
file was stored. That says nothing about what happened to the objects since (deleted by hand,
by a bucket lifecycle rule, by a bug): such a checkpoint still looks complete, and a resume
only finds out when it downloads it. ``--verify`` checks every object a manifest names — its
own files and, for deduplicated ones, those stored under another checkpoint — by listing the
folders that hold them and comparing each object's presence and size with the manifest.

Contents are not read: that would download every checkpoint, and a resume already checks each
file's CRC-32 as its bytes arrive. Presence and size cost one listing request per folder.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from mltrainer.manifest import Manifest

LIST_CONCURRENCY = 8


def object_problems(store, manifests: Iterable[Manifest]) -> dict[str, list[str]]:
    """For each manifest's store path, what is wrong with the objects it names ([] when nothing).

    ``store`` needs ``list_artifacts(folder)`` returning entries with ``path``, ``is_dir`` and
    ``file_size`` (a run's ``RunArtifacts``). Each folder is listed once, however many
    manifests point into it.
    """
    manifests = list(manifests)
    folders = sorted({posixpath.dirname(e.stored_at) for m in manifests for e in m.files})

    def listing(folder: str) -> dict[str, int | None]:
        return {entry.path: entry.file_size for entry in store.list_artifacts(folder) if not entry.is_dir}

    with ThreadPoolExecutor(max_workers=LIST_CONCURRENCY, thread_name_prefix="verify") as pool:
        sizes: dict[str, int | None] = {}
        for found in pool.map(listing, folders):
            sizes.update(found)

    problems: dict[str, list[str]] = {}
    for manifest in manifests:
        found = problems.setdefault(manifest.store_path, [])
        for entry in manifest.files:
            if entry.stored_at not in sizes:
                found.append(f"{entry.stored_at}: missing (the manifest lists {entry.size} bytes)")
            elif sizes[entry.stored_at] is not None and sizes[entry.stored_at] != entry.size:
                found.append(f"{entry.stored_at}: {sizes[entry.stored_at]} bytes, the manifest lists {entry.size}")
    return problems
