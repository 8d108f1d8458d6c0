"""Run the mltrainer CLI with a node that, from its Nth checkpoint on, reports its files stored
without sending them (fault injection for test_trainer_multinode.py): the main process must not
take the node's word for it.

    torchrun ... skip_node_uploads.py N MLTRAINER_ARGS...
"""

from __future__ import annotations

import sys

from mltrainer import cli, node_upload
from mltrainer.manifest import file_digest

lie_from, args = int(sys.argv[1]), sys.argv[2:]
jobs = 0
store = node_upload.NodeFilesUploader._store


def store_or_just_report(self, job):
    global jobs
    jobs += 1
    if jobs < lie_from:
        return store(self, job)
    print(f"skip_node_uploads: node {self.node} reports {job.store_path} without storing it", flush=True)
    return {rel: file_digest(job.snapshot / rel) for rel in job.files}


node_upload.NodeFilesUploader._store = store_or_just_report
sys.exit(cli.main(args))
