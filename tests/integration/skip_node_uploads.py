"""Run the mltrainer CLI with a node that reports its checkpoint files stored without sending
them (fault injection for test_trainer_multinode.py): the main process must not take the
node's word for it.

    torchrun ... skip_node_uploads.py MLTRAINER_ARGS...
"""

from __future__ import annotations

import sys

from mltrainer import cli, node_upload
from mltrainer.manifest import file_digest


def report_without_storing(self, job):
    return {rel: file_digest(job.snapshot / rel) for rel in job.files}


node_upload.NodeFilesUploader._store = report_without_storing
sys.exit(cli.main(sys.argv[1:]))
