"""Metrics of a LoggedModel: what the run measured, shown on the model's row and page in the UI.

``log_model(step=...)`` links only the metrics logged at exactly that step; an evaluation that ran
a few steps before the end (eval_steps not dividing the last step) would be left out. Linking the
run's latest value of every metric gives the model the numbers the run ended with.
"""

from __future__ import annotations

SYSTEM_PREFIX = "system/"  # the machine's use while training (system_metrics.py), not the model's


def link_final_metrics(client, run_id: str, model_id: str) -> list[str]:
    """Link the latest value of each of the run's metrics to ``model_id``; returns their keys.

    Each is re-sent as the same (key, value, step, timestamp) it was logged with: the server
    keeps the run's history as it is and records the value against the model.
    """
    from mlflow.entities import Metric

    run = client.get_run(run_id)
    latest = [m for m in run.data._metric_objs  # the Metric entities behind run.data.metrics
              if not m.key.startswith(SYSTEM_PREFIX)]
    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id) for m in latest]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    return sorted(m.key for m in metrics)
