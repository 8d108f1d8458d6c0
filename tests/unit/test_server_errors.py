"""No database text from MLflow server errors reaches the user (mltrainer/server_errors.py)."""

from __future__ import annotations

from mlflow.exceptions import RestException

from mltrainer.server_errors import describe, without_database_text

# What MLflow 3.17's SQL store answers when two clients create one experiment (seen on PostgreSQL).
UNIQUE_VIOLATION = (
    "Experiment(name=exp-1) already exists. Error: (psycopg2.errors.UniqueViolation) duplicate key value "
    'violates unique constraint "experiments_name_key"\nDETAIL:  Key (name)=(exp-1) already exists.\n\n'
    "[SQL: INSERT INTO experiments (name, artifact_location, lifecycle_stage, creation_time, last_update_time) "
    "VALUES (%(name)s, %(artifact_location)s, %(lifecycle_stage)s, %(creation_time)s, %(last_update_time)s) "
    "RETURNING experiments.experiment_id]\n[parameters: {'name': 'exp-1'}]\n"
    "(Background on this error at: https://sqlalche.me/e/20/gkpj)"
)


def test_database_text_is_cut():
    assert without_database_text(UNIQUE_VIOLATION) == \
        "Experiment(name=exp-1) already exists (database details withheld)"


def test_describe_keeps_the_error_code():
    # How MLflow's REST client raises what the server answered.
    exc = RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": UNIQUE_VIOLATION})
    text = describe(exc)
    assert text == "RESOURCE_ALREADY_EXISTS: Experiment(name=exp-1) already exists (database details withheld)"
    for leak in ("INSERT", "psycopg2", "experiments_name_key", "parameters", "sqlalche"):
        assert leak not in text


def test_message_that_is_only_database_text():
    assert without_database_text("(sqlalchemy.exc.OperationalError) server closed the connection") == \
        "database error (details withheld)"


def test_ordinary_messages_are_kept_whole():
    assert without_database_text("Run 'abc' not found") == "Run 'abc' not found"
    assert without_database_text("please select a run from the list") == "please select a run from the list"
    assert without_database_text("first line\nsecond line") == "first line"
