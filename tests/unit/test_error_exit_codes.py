"""Each error class carries its exit code and label; the CLI reports those, and nothing else.

The codes are part of the interface (README, "Exit codes"): scripts and restart loops branch on them.
"""

from __future__ import annotations

import pytest

from mltrainer import cli
from mltrainer.best import RegistryError, SelectionError
from mltrainer.errors import ConfigError, MltrainerError, TrackingError
from mltrainer.lease import RunInUseError
from mltrainer.resume import ResumeError, RunAlreadyFinished
from mltrainer.tracking import TrackingError as TrackingErrorViaTracking
from mltrainer.uploader import UploadError


class FinishedRun:  # the shape of mlflow's Run, as far as RunAlreadyFinished reads it
    class info:  # noqa: N801
        run_id = "r1"
        run_name = "tiny"

    class data:  # noqa: N801
        tags = {"checkpoint.latest": "checkpoints/step-4"}


CASES = [
    (ConfigError("training.learning_rate", "expected a number"), 2,
     "config error: training.learning_rate: expected a number"),
    (SelectionError("invalid filter string 'x'"), 2, "error: invalid filter string 'x'"),
    (TrackingError("the MLflow server at http://h is unreachable"), 3,
     "tracking error: the MLflow server at http://h is unreachable"),
    (RegistryError("registering failed"), 3, "tracking error: registering failed"),
    (UploadError([]), 4, "upload error: "),
    (ResumeError("run 'x' not found"), 5, "resume error: run 'x' not found"),
    (RunInUseError("run r1 is in use by host h pid 1"), 5, "resume error: run r1 is in use by host h pid 1"),
]


@pytest.mark.parametrize("error,code,line", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_class_ends_the_cli_with_its_code_and_label(capsys, error, code, line):
    assert isinstance(error, MltrainerError)

    def fail():
        raise error

    assert cli._guarded(fail) == (None, code)
    assert capsys.readouterr().err.startswith(line)


def test_a_finished_run_is_an_outcome_on_stdout_with_exit_0(capsys):
    def fail():
        raise RunAlreadyFinished(FinishedRun)

    assert cli._guarded(fail) == (None, 0)
    captured = capsys.readouterr()
    assert "run tiny (r1) already finished" in captured.out and captured.err == ""


def test_a_bare_value_error_is_a_bug_not_a_config_error(capsys):
    """Only ConfigError means bad input: a ValueError from anywhere else keeps its traceback."""
    def fail():
        raise ValueError("list index arithmetic went wrong")

    with pytest.raises(ValueError, match="arithmetic"):
        cli._guarded(fail)
    assert "config error" not in capsys.readouterr().err


def test_the_server_refusing_a_request_is_a_tracking_error(capsys):
    from mlflow.exceptions import MlflowException

    def fail():
        raise MlflowException("Run 'x' already exists. Error: (psycopg2.errors.UniqueViolation) duplicate key",
                              error_code="RESOURCE_ALREADY_EXISTS")

    assert cli._guarded(fail) == (None, 3)
    err = capsys.readouterr().err
    assert err.startswith("tracking error: ") and "Run 'x' already exists" in err and "psycopg2" not in err


def test_tracking_error_is_one_class_wherever_it_is_imported_from():
    assert TrackingErrorViaTracking is TrackingError
