"""Patches of MLflow 3.17 internals the server needs, one per module; mlstack.mlflow_app composes them.

Each module's ``PATCH`` (``self_check.Patch``) names an ``install`` that is idempotent (create_app
may run twice in one process) and a ``check`` that looks at its effect, so that a patch a newer
MLflow or FastAPI leaves without a target stops the server instead of silently doing nothing. Each
module says in its docstring what MLflow does without it and why that is not good enough here.
"""
