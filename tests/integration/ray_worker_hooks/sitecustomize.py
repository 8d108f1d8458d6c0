"""Fault injection for test_ray_cluster.py, on the worker node's PYTHONPATH only: once the file
named by ``MLTRAINER_TEST_HOLD_MANIFESTS`` exists, a checkpoint's manifest is held back after its
files are stored, and ``<that file>.held`` names the checkpoint. The test then kills the node: a
checkpoint whose files are all in the store and whose manifest never came.
"""

import os

HOLD = os.environ.get("MLTRAINER_TEST_HOLD_MANIFESTS")

if HOLD:
    import time

    from mltrainer import transfer
    from mltrainer.manifest import MANIFEST_NAME

    log_artifact = transfer.RunArtifacts.log_artifact

    def held_manifest(self, local_file, artifact_path=None):
        if os.path.basename(local_file) == MANIFEST_NAME and os.path.exists(HOLD):
            with open(f"{HOLD}.held", "a") as out:
                out.write(f"{artifact_path}\n")
            while True:  # until the node is killed
                time.sleep(60)
        log_artifact(self, local_file, artifact_path)

    transfer.RunArtifacts.log_artifact = held_manifest
