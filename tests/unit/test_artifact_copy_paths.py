"""Which server-side copies the server makes: only from a file of the destination's own run."""

from __future__ import annotations

import pytest

from mlstack.patches.artifact_copy import CopyRefused, copy_source, run_root_of

DEST = "3/0123456789abcdef0123456789abcdef/artifacts/checkpoints/step-00000016/config.json"
ROOT = "3/0123456789abcdef0123456789abcdef/artifacts"


def test_the_source_is_resolved_inside_the_destinations_run():
    assert run_root_of(DEST) == ROOT
    assert copy_source(DEST, "checkpoints/step-00000008/config.json") == f"{ROOT}/checkpoints/step-00000008/config.json"


@pytest.mark.parametrize("source", [
    "../other-run/artifacts/secret.bin",
    "checkpoints/../../other-run/artifacts/x",
    "checkpoints/%2e%2e/%2e%2e/x",
    "/3/other/artifacts/x",
    "checkpoints/./x",
    "checkpoints//x",
    "",
    "checkpoints/",
])
def test_a_source_that_could_leave_the_run_is_refused(source):
    with pytest.raises(CopyRefused):
        copy_source(DEST, source)


def test_a_copy_onto_itself_is_refused():
    with pytest.raises(CopyRefused, match="same object"):
        copy_source(DEST, "checkpoints/step-00000016/config.json")


@pytest.mark.parametrize("destination", ["3/run/config.json", "3/models/m-1/artifacts/x", "3/run/artifacts"])
def test_a_destination_outside_a_runs_artifacts_is_refused(destination):
    with pytest.raises(CopyRefused, match="not a file inside a run's artifacts"):
        run_root_of(destination)


def test_every_put_artifact_route_of_mlflows_router_makes_copies_once_patched():
    """On MLflow's real artifact router, grouped as FastAPI groups an included router."""
    from fastapi import FastAPI
    from mlflow.server.artifact_router import artifact_router

    from mlstack.patches.artifact_copy import check_artifact_copy, install_artifact_copy

    app = FastAPI()
    app.include_router(artifact_router)
    assert "makes no server-side copies" in check_artifact_copy(app)
    assert install_artifact_copy(app) == 2
    assert check_artifact_copy(app) is None
    assert install_artifact_copy(app) == 2  # a second create_app in one process: still ours, not wrapped twice
    # Uploads without the header still go MLflow's way, which still asks for the streaming hook.
    from mlstack.patches.streaming_upload import check_streaming_upload, install_streaming_upload

    install_streaming_upload()
    assert check_streaming_upload(app) is None


def test_the_patched_route_answers_a_copy_that_leaves_the_run_with_400(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from mlflow.server import SERVE_ARTIFACTS_ENV_VAR
    from mlflow.server.artifact_router import artifact_router

    from mlstack.patches.artifact_copy import COPY_FROM_HEADER, install_artifact_copy

    monkeypatch.setenv(SERVE_ARTIFACTS_ENV_VAR, "true")
    app = FastAPI()
    app.include_router(artifact_router)
    install_artifact_copy(app)
    resp = TestClient(app).put(f"/api/2.0/mlflow-artifacts/artifacts/{DEST}",
                               headers={COPY_FROM_HEADER: "../../other-run/artifacts/secret.bin"})
    assert resp.status_code == 400, resp.text
    assert "copy source" in resp.json()["message"] and "refused" in resp.json()["message"]
