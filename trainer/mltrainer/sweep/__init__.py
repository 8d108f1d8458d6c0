"""Hyperparameter sweeps: one MLflow parent run, one nested child run per trial.

A sweep file names a training config and a search space over its dotted keys::

    name: tiny-lr                       # optional; default: the sweep file's name
    base: tiny.yaml                     # a training config, relative to this file
    overrides: [training.max_steps=8]   # optional, applied to the base config first
    search:
      space:
        training.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
        training.per_device_train_batch_size: {type: categorical, choices: [8, 16]}
        training.warmup_steps: {type: int, low: 0, high: 4}
      trials: 8
      metric: eval_loss                 # a metric the trial runs log (TrainResult.metrics)
      direction: minimize               # or maximize
      backend: optuna                   # or ray
      algorithm: tpe                    # tpe | random | grid (grid: optuna only)
      parallel: 1                       # trials at a time
      seed: 7                           # sampler seed (optional)
      ray_address: null                 # ray: a cluster (head host:port); null: RAY_ADDRESS, else a local Ray
      storage: null                     # optuna: sqlite file (or any RDB URL)

Every trial is an ordinary :func:`mltrainer.train.train` run (our run naming, checkpoint policy
and uploads), created as a child of the sweep's parent run and tagged ``mltrainer.trial=<n>``;
its chosen values are logged again as ``trial.<key>`` params. The parent records the search
(algorithm, backend, space as JSON, trial count, metric, direction) and, as trials finish, the
best value (``best_<metric>``), the best trial's run id (tag ``best_trial_run_id``) and values
(``best.<key>``), each trial's value (``trial_<metric>`` at step = trial number) and plots.

Resuming (optuna): the study lives in a sqlite file, by default
``<output_root>/sweeps/<name>.db``, and remembers its parent run id. Running the same sweep
command again continues the same study and parent run and only runs the trials still missing;
trials that were cut off mid-run are marked failed (``interrupted``) and not counted.
``--fresh`` starts over. The ray backend does not resume: each invocation is a new sweep.

The package, one concern per module: ``spec`` (the sweep file), ``space`` (the search space),
``trial`` (one trial run), ``parent`` (the parent run and the trials' aggregates), ``tags`` (the
tag names), ``optuna_backend`` and ``ray_backend``, ``run`` (the entry point) and ``report``
(the table the CLI prints).
"""

from .parent import SweepOutcome, TrialRecord, best_of
from .ray_backend import trial_number_from_id
from .report import format_trials
from .run import run_sweep
from .space import ParamSpec, parse_param
from .spec import LoadedSweep, SweepSpec, load_sweep

__all__ = ["LoadedSweep", "ParamSpec", "SweepOutcome", "SweepSpec", "TrialRecord", "best_of", "format_trials",
           "load_sweep", "parse_param", "run_sweep", "trial_number_from_id"]
