"""Run the mltrainer CLI with every checkpoint manifest stored 1.5 s after the checkpoint's files
(fault injection for test_logged_checkpoints.py): a window in which a folder holds its files and
no manifest, long enough for the test to look at what the MLflow server lists meanwhile.

    python slow_manifests.py MLTRAINER_ARGS...
"""

from __future__ import annotations

import os
import sys
import time

from mltrainer import cli, transfer
from mltrainer.manifest import MANIFEST_NAME

log_artifact = transfer.RunArtifacts.log_artifact


def slow_manifest(self, local_file, artifact_path=None):
    if os.path.basename(local_file) == MANIFEST_NAME:
        time.sleep(1.5)
    log_artifact(self, local_file, artifact_path)


transfer.RunArtifacts.log_artifact = slow_manifest
sys.exit(cli.main(sys.argv[1:]))
