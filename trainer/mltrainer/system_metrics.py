"""System metrics of a training run (``system/cpu_utilization_percentage``, memory, disk, network,
and GPU utilisation and memory where nvidia-ml-py or pyrsmi is installed), logged by MLflow's own
SystemMetricsMonitor while the run trains; ``tracking.system_metrics: false`` turns them off.

Rank 0 only: it owns the run. MLflow samples every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
changes that) and drops the samples of the last, unfinished interval when stopped; :func:`stop`
logs them, so a run shorter than one interval still gets its system metrics.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def start(run_id: str, tracking_uri: str | None, *, resumed: bool):
    """A running monitor for ``run_id``; a resumed run continues its system metrics' steps."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines (started, stopping, "Skip logging GPU metrics" on every CPU machine) ask
    # nothing of the user; its warnings (a failed log) still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop(monitor) -> None:
    """Stop ``monitor`` (None: nothing to stop) and log the samples taken since its last log.

    Best effort: system metrics must never fail a training, nor hide the error that ends one.
    """
    if monitor is None:
        return
    try:
        monitor.finish()
        monitor.collect_metrics()  # CPU use is averaged since the previous sample
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception:  # noqa: BLE001
        logger.warning("could not log the last system metrics", exc_info=True)
