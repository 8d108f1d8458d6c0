"""Is the tracking server usable? One request, asked before any work, with settings of its own.

MLflow's client retries a failing request 7 times with exponential backoff (over 4 minutes for a
server that is down). The probe must fail fast, yet it must not lower those limits for anyone
else: they are process-wide (environment variables), and parallel sweep trials (threads) may be
uploading checkpoints at the very moment another trial starts and probes. So the probe makes its
own request, with its own retries and timeout, and reads the answer by HTTP status code.
"""

from __future__ import annotations

import logging
import time

from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from mltrainer.errors import TrackingError
from mltrainer.server_errors import without_database_text

logger = logging.getLogger(__name__)

PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
PROBE_TIMEOUT_SECONDS = 30  # one slow answer from a loaded server is not an outage
PROBE_RETRIES = 1  # one more try for a dropped connection; MLflow's default is 7, with backoff
BUSY_PATIENCE_SECONDS = 60.0
BUSY_INTERVAL_SECONDS = 2.0
HTTP_OK, HTTP_UNAUTHORIZED, HTTP_BUSY = 200, 401, 503


def check_server(uri: str, *, patience: float = BUSY_PATIENCE_SECONDS) -> None:
    """Return when the server at ``uri`` answers a search with the configured credentials.

    Raises:
        TrackingError: naming ``uri``, when it is not http(s), is unreachable, rejects the
            credentials (401), or answers anything else but 200. A server answering 503 (busy:
            its database pool exhausted, say) is up, not down: it is asked again for ``patience``
            seconds first.
    """
    if not uri.startswith(("http://", "https://")):
        raise TrackingError(f"MLFLOW_TRACKING_URI must be the stack's http(s) URI, got {uri!r}")
    creds = get_default_host_creds(uri)
    logger.info("tracking server %s, user %s", uri, creds.username or "(none set)")
    deadline = time.monotonic() + patience
    while True:
        try:
            response = http_request(creds, PROBE_ENDPOINT, "GET", params={"max_results": 1},
                                    max_retries=PROBE_RETRIES, backoff_factor=1, timeout=PROBE_TIMEOUT_SECONDS,
                                    raise_on_status=False)
        except MlflowException as exc:  # no HTTP answer at all: refused, reset, timed out, bad host
            raise TrackingError(f"the MLflow server at {uri} is unreachable: {exc.message.splitlines()[0]}") from None
        if response.status_code == HTTP_OK:
            return
        if response.status_code == HTTP_UNAUTHORIZED:
            raise TrackingError(
                f"the MLflow server at {uri} rejected the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD)")
        if response.status_code == HTTP_BUSY and time.monotonic() < deadline:
            logger.warning("the MLflow server is busy (503); asking again in %.0f s", BUSY_INTERVAL_SECONDS)
            time.sleep(BUSY_INTERVAL_SECONDS)
            continue
        raise TrackingError(f"the MLflow server at {uri} is not usable: HTTP {response.status_code}: "
                            f"{without_database_text(response.text) or response.reason}")
