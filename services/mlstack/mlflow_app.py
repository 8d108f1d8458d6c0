"""The ASGI app gunicorn serves: MLflow's FastAPI app with basic auth, and the patches it needs.

Each patch of MLflow's internals lives in its own module under ``mlstack.patches``, saying what
MLflow does without it; the server's own hooks (login limits, request limits, the user admin
guard) are modules of ``mlstack``. Each is a ``Patch`` whose check looks at its effect; this
module installs them in the order they need, then refuses to serve unless every one took hold
(``mlstack.patches.self_check``).
"""

from __future__ import annotations


def create_app():
    from fastapi import FastAPI
    from mlflow.server.auth import create_app as create_auth_app

    from mlstack import login_limiter, request_limits, user_admin_guard
    from mlstack.patches import (artifact_copy, direct_middleware, idle_ping, light_run_lookup, login_check_once,
                                 metric_upsert, presigned_transfers, request_parsing, route_misses,
                                 streaming_download, streaming_upload, user_lookup_once)
    from mlstack.patches.self_check import Patching, versions

    patching = Patching()
    # Patches of MLflow's modules and classes: before the auth app is built from them.
    # login_check_once before login_limiter (below), which wraps it in turn.
    for patch in (idle_ping.PATCH, streaming_upload.PATCH, presigned_transfers.PATCH, light_run_lookup.PATCH,
                  metric_upsert.PATCH, request_parsing.PATCH, user_admin_guard.PATCH, login_check_once.PATCH):
        patching.install(patch)
    app = create_auth_app()
    if not isinstance(app, FastAPI):
        # mlstack.mlflow_server asks for it (_MLFLOW_SGI_NAME=uvicorn); every hook below and
        # MLflow's own Host-header and CORS checks are parts of the FastAPI app.
        raise RuntimeError(f"MLflow's auth app is a {type(app).__name__}, not its FastAPI app, on {versions()}: "
                           "review mlstack.mlflow_server")
    # Changes to the built app. Middleware added last runs first: sizes and paths are checked
    # before anything else, then failed logins are limited, then MLflow's auth runs.
    for patch in (direct_middleware.PATCH, user_lookup_once.PATCH, route_misses.PATCH, login_limiter.PATCH,
                  streaming_download.PATCH, artifact_copy.PATCH, request_limits.PATCH):
        patching.install(patch, app)
    patching.require_in_effect(app)
    return app
