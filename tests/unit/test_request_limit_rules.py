"""The pure rules of services/mlstack/request_limits.py (the server side is tested in
tests/integration/test_request_limits.py)."""

from __future__ import annotations

import pytest

from mlstack.request_limits import (
    _JSON_NUL, BODY_BOUNDS, DEFAULT_BODY_BOUND, artifact_path_problem, body_bound, max_artifact_path_bytes,
)


@pytest.mark.parametrize("raw", [b"a/b.bin", b"checkpoints/step-00000004/model.safetensors", b"folder/",
                                 b"%C3%A9t%C3%A9/x", b"100%25.txt", b"x" * 255])
def test_good_paths(raw):
    assert artifact_path_problem(raw, 950) is None


@pytest.mark.parametrize("raw, says", [
    (b"", "is empty"), (b"/etc/passwd", "is absolute"), (b"a\\b", "backslash"), (b"a%5cb", "backslash"),
    (b"a%00b", "U+0000"), (b"a%7Fb", "U+007F"), (b"%FF", "not valid UTF-8"), (b"a/../b", "'..' segment"),
    (b"%252E%252E/b", "'..' segment"), (b"a/./b", "'.' segment"), (b"a//b", "empty folder name"),
    (b"x" * 256, "at most 255 bytes"), (b"%C3%A9" * 128, "at most 255 bytes"), (b"a/" * 476, "at most 950"),
])
def test_bad_paths_are_named(raw, says):
    assert says in artifact_path_problem(raw, 950)


def test_path_bound_leaves_room_for_the_key_prefix_and_the_run_root():
    assert max_artifact_path_bytes("s3://mlflow/artifacts") == 1024 - len("artifacts/") - 64
    assert max_artifact_path_bytes("s3://bucket") == 1024 - len("/") - 64


def test_uploads_are_unbounded_and_api_routes_get_their_own_bound():
    assert body_bound("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model.bin") is None
    assert body_bound("PUT", "/ajax-api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model.bin") is None
    assert body_bound("POST", "/api/2.0/mlflow/runs/set-tag") == BODY_BOUNDS["runs/set-tag"]
    assert body_bound("POST", "/ajax-api/2.0/mlflow/runs/log-batch") == BODY_BOUNDS["runs/log-batch"]
    assert body_bound("POST", "/api/2.0/mlflow/runs/search") == DEFAULT_BODY_BOUND
    assert body_bound("GET", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model.bin") == DEFAULT_BODY_BOUND
    # The case: a 100 MB tag value is far over; the largest honest set-tag is not.
    assert 12 * 8250 < BODY_BOUNDS["runs/set-tag"] < 200_000


@pytest.mark.parametrize("body, nul", [(rb'{"v": "a\u0000"}', True), (rb'{"v": "a\\\u0000"}', True),
                                       (rb'{"v": "a\\u0000"}', False), (rb'{"v": "a\\\\u0000"}', False),
                                       (rb'{"v": "a\u00001"}', True), (rb'{"v": "a\u0001"}', False)])
def test_json_nul_escape_is_told_from_the_text_backslash_u0000(body, nul):
    assert bool(_JSON_NUL.search(body)) is nul
