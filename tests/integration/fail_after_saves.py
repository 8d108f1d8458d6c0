"""Run the mltrainer CLI with a training that ends in an exception right after its Nth save, while
checkpoints are still queued for upload (fault injection for test_trainer_ends_with_error.py).

    python fail_after_saves.py N error|interrupt MLTRAINER_ARGS...

Each upload starts 2 s late, so when the exception comes the first checkpoint is still being
stored and the second waits in the queue: what happens to them is what the test looks at.
"""

from __future__ import annotations

import sys
import time

from mltrainer import callback, cli, uploader

fail_after, kind, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
saves = 0
store_checkpoint = uploader.CheckpointUploader._store_checkpoint
on_save = callback.StoreCheckpointsCallback.on_save


def slow_store(self, job):
    time.sleep(2)
    store_checkpoint(self, job)


def failing_on_save(self, *a, **kw):
    global saves
    on_save(self, *a, **kw)
    saves += 1
    if saves == fail_after:
        print(f"fail_after_saves: {kind} after save {saves}", flush=True)
        raise KeyboardInterrupt() if kind == "interrupt" else RuntimeError(f"injected failure after save {saves}")


uploader.CheckpointUploader._store_checkpoint = slow_store
callback.StoreCheckpointsCallback.on_save = failing_on_save
sys.exit(cli.main(args))
