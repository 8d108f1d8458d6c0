"""Patches of MLflow 3.17 internals the server needs, one per module; mlstack.mlflow_app composes them.

Each module's ``install_*`` is idempotent (create_app may run twice in one process) and says in
its docstring what MLflow does without it and why that is not good enough here.
"""
