"""The metrics a checkpoint policy names: can the run produce them, and did they appear?

``checkpoints.monitor`` ranks checkpoints, and ``checkpoints.path_template`` may put metrics in
their names; both read the metrics the Trainer logged at the step of each save. A name the run
never logs at a save used to be silent: ``upload: best`` stored nothing and exited 0, and with
``save_top_k`` no ``checkpoint.best`` was ever set. So:

* at load, :func:`metric_problem` refuses a name this trainer cannot log before a save (a typo,
  an eval metric without evaluation, a metric only logged after training);
* at run time, :class:`MonitorWatch` warns at the first save that lacks the monitored metric
  (the schedules of logging, evaluation and saving may never meet), naming what was logged
  there, and says at the end when it never appeared at any save.

What happens to the checkpoints then is the policy's rule (``RetentionState.should_upload``):
``upload: best`` still stores the final save when nothing else is stored, so no run ends with
an empty store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from mltrainer.errors import did_you_mean

logger = logging.getLogger(__name__)

# What the HF Trainer logs (we pass no compute_metrics): every logging_steps, and at each evaluation.
TRAIN_METRICS = ("loss", "grad_norm", "learning_rate", "epoch")
EVAL_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
# Logged once, when training ends: after the last save, so never seen by one.
AFTER_TRAINING_METRICS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                          "total_flos")


def metric_problem(name: str, *, has_eval_data: bool, evaluates: bool) -> str | None:
    """Why metric ``name`` can never be there at a save of this run, or ``None`` if it can.

    ``evaluates``: whether the Trainer runs evaluation at all (``TrainConfig.evaluates``).
    """
    if name in TRAIN_METRICS:
        return None
    if name in EVAL_METRICS:
        if not has_eval_data:
            return f"{name!r} needs evaluation data: set data.hub.split_eval or data.files.eval"
        if not evaluates:
            return f"{name!r} is only computed when training.eval_strategy is 'steps' or 'epoch'"
        return None
    if name in AFTER_TRAINING_METRICS:
        hint = "; 'loss' is the training loss, logged every training.logging_steps" if name == "train_loss" else ""
        return f"{name!r} is logged only when training ends, after the last save, so no checkpoint has it{hint}"
    known = TRAIN_METRICS + EVAL_METRICS
    return (f"{name!r} is not a metric this trainer logs{did_you_mean(name, known)} "
            f"(it logs {', '.join(TRAIN_METRICS)}, and with evaluation {', '.join(EVAL_METRICS)})")


class MonitorWatch:
    """Notices saves that lack ``monitor``: warns at the first, and knows whether any had it.

    ``seen`` starts true when the store already holds a checkpoint ranked by it (a resumed run).
    """

    def __init__(self, monitor: str | None, *, seen: bool = False):
        self.monitor = monitor
        self.seen = seen
        self.saves_without: list[int] = []

    def at_save(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.monitor is None:
            return
        if self.monitor in metrics:
            self.seen = True
            return
        self.saves_without.append(step)
        if len(self.saves_without) == 1:
            logger.warning(
                "checkpoints.monitor %r is not among the metrics logged at step %d, where a checkpoint was "
                "saved (logged there: %s); this checkpoint cannot be ranked, and if no save ever has %r, "
                "checkpoint.best is never set", self.monitor, step, ", ".join(sorted(metrics)) or "none",
                self.monitor)

    def problem(self, latest: str | None) -> str | None:
        """At the end: what went wrong when no save ever had the metric (``latest``: what is stored)."""
        if self.monitor is None or self.seen or not self.saves_without:
            return None
        steps = ", ".join(str(s) for s in self.saves_without[:10]) + (", ..." if len(self.saves_without) > 10 else "")
        kept = (f"the newest checkpoint is stored as {latest} (checkpoint.latest)" if latest
                else "no checkpoint is stored")
        return (f"checkpoints.monitor {self.monitor!r} was not logged at any save (steps {steps}), so no "
                f"checkpoint was ranked and checkpoint.best is not set; {kept}. Log it at the steps that save "
                "(training.logging_steps, eval_steps, save_steps) or monitor another metric")
