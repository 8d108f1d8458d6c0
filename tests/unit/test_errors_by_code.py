"""Server errors are told apart by MLflow's error code, never by words that happen to be in the text."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

from mltrainer.best import _is_bad_request
from mltrainer.resume import run_lookup_error

RUN = "0123456789abcdef0123456789abcdef"


def test_a_run_the_server_cannot_find_or_hides_is_not_found():
    for code in (RESOURCE_DOES_NOT_EXIST, PERMISSION_DENIED):  # the auth layer answers 403 for a hidden run
        exc = MlflowException("some wording of the day", error_code=code)
        assert run_lookup_error(RUN, exc) == f"run {RUN!r} not found (or not readable by this MLflow user)"


def test_a_server_fault_mentioning_403_or_404_is_not_taken_for_not_found():
    exc = MlflowException("worker 404 crashed after 403 requests", error_code=INTERNAL_ERROR)
    assert run_lookup_error(RUN, exc).startswith(f"run {RUN!r} could not be read: worker 404 crashed")


def test_bad_filter_is_known_by_its_code_not_by_the_word_invalid():
    assert _is_bad_request(MlflowException("filter: unexpected token", error_code=INVALID_PARAMETER_VALUE))
    assert not _is_bad_request(MlflowException("Invalid response from the database pool", error_code=INTERNAL_ERROR))
