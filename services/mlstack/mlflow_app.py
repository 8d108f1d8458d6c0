"""The ASGI app gunicorn serves: MLflow's FastAPI app with basic auth, and the patches it needs.

Each patch of MLflow's internals lives in its own module under ``mlstack.patches``, saying what
MLflow does without it; the server's own hooks (login limits, request limits, the user admin
guard) are modules of ``mlstack``. This module only composes them, in the order they need.
"""

from __future__ import annotations

import os


def create_app():
    from mlflow.server.auth import create_app as create_auth_app

    from mlstack.login_limiter import install_login_limiter
    from mlstack.patches.light_run_lookup import install_light_run_lookup
    from mlstack.patches.presigned_transfers import install_presigned_transfers
    from mlstack.patches.streaming_download import install_streaming_download
    from mlstack.patches.streaming_upload import install_streaming_upload
    from mlstack.request_limits import limit_requests
    from mlstack.user_admin_guard import install_user_directory_guard

    # Patches of MLflow's modules and classes: before the auth app is built from them.
    install_streaming_upload()
    install_presigned_transfers(os.environ.get("S3_PUBLIC_ENDPOINT_URL", ""))
    install_light_run_lookup()
    install_user_directory_guard()
    app = create_auth_app()
    # Changes to the built app.
    install_login_limiter(app)
    install_streaming_download(app)
    limit_requests(app)  # last added runs first: sizes and paths are checked before anything else
    return app
