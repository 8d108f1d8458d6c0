"""The ray backend: each trial in a Ray worker (a local Ray, or a cluster); no resuming.

On a cluster (``search.ray_address``, else Ray's own ``RAY_ADDRESS``) the trials run on whichever
nodes have a free CPU; each trial's run is tagged with its node's id when it is created. A trial
whose node dies takes its worker with it, so nothing on that node can close its run: the sweep
marks it FAILED here, and the uploader's manifest-last order means a checkpoint cut off mid-upload
is never listed as complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .parent import SweepOutcome, TrialRecord, create_parent, finish_parent, safe_terminate, summarize
from .space import ParamSpec
from .spec import LoadedSweep
from .tags import TAG_RAY_NODE, TAG_TRIAL
from .trial import TrialJob, find_child_run, run_trial

logger = logging.getLogger(__name__)


RAY_FORWARDED_ENV = ("MLFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "AWS_", "PYTHONPATH")
ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable for the cluster a driver joins


def cluster_address(spec) -> str | None:
    """The cluster to run on: the sweep file's ``ray_address``, else ``RAY_ADDRESS``; None: a local Ray.

    Read here rather than left to ``ray.init``: a local Ray is started with our CPU count, which
    Ray refuses when it is also joining a cluster named by the environment.
    """
    return spec.ray_address or os.environ.get(ADDRESS_ENV) or None


def trial_number_from_id(trial_id: str) -> int | None:
    """Ray trial ids end in a zero-padded counter (``a1b2c_00003`` -> 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _ray_trainable(config: dict[str, Any], job: TrialJob | None = None) -> None:
    """Ray Tune function trainable: one trial = one train() child run in this Ray worker."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    number = trial_number_from_id(trial_id)
    values = {key: config[key] for key in job.keys}
    node = {TAG_RAY_NODE: ray.get_runtime_context().get_node_id()}
    value, run_id = run_trial(job, number if number is not None else -1, values, extra_tags=node)
    tune.report({job.metric: value, "run_id": run_id, "trial_number": number})


def close_dead_trial_run(client, run_id: str, number: int | None, error: str | None) -> None:
    """A failed trial's run still RUNNING lost its process (its node died): mark it FAILED.

    A trial that failed inside training closed its own run; only one whose worker was killed
    (node lost, out of memory) leaves it open, and nothing else would ever close it.
    """
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
        logger.warning("trial %s (run %s) ended without closing its run (%s): marked FAILED", number, run_id,
                       error or "no error reported")
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the sweep's outcome matters more than this run's status
        logger.warning("could not mark the run %s of failed trial %s FAILED", run_id, number, exc_info=True)


def _ray_domain(param: ParamSpec):
    from ray import tune

    if param.type == "categorical":
        return tune.choice(list(param.choices))
    if param.type == "int":
        if param.log:
            return tune.lograndint(int(param.low), int(param.high) + 1)
        return tune.qrandint(int(param.low), int(param.high), int(param.step)) if param.step \
            else tune.randint(int(param.low), int(param.high) + 1)
    if param.log:
        return tune.loguniform(float(param.low), float(param.high))
    return tune.quniform(float(param.low), float(param.high), param.step) if param.step \
        else tune.uniform(float(param.low), float(param.high))


def run_ray(loaded: LoadedSweep, client, *, max_trials: int | None) -> SweepOutcome:
    import ray
    from ray import tune

    spec = loaded.spec
    n = spec.trials if max_trials is None else min(spec.trials, max_trials)
    from mltrainer import tracking

    experiment_id = tracking.get_or_create_experiment(client, loaded.base_cfg.experiment.name)
    parent_run_id = create_parent(client, loaded, experiment_id)
    logger.info("sweep %s (ray): parent run %s, %d trials", spec.name, parent_run_id, n)
    job = TrialJob(spec.name, loaded.base_data, loaded.config_dir, parent_run_id, experiment_id, spec.metric,
                   tuple(spec.space))
    env = {k: v for k, v in os.environ.items() if k.startswith(RAY_FORWARDED_ENV)}
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    started_here = not ray.is_initialized()
    if started_here:
        if address := cluster_address(spec):
            logger.info("sweep %s: joining the Ray cluster at %s", spec.name, address)
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            ray.init(num_cpus=max(2, spec.parallel), include_dashboard=False, runtime_env={"env_vars": env},
                     log_to_driver=True)
    try:
        search_alg = None
        if spec.algorithm == "tpe":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed), metric=spec.metric,
                                      mode="min" if spec.direction == "minimize" else "max")
        elif spec.seed is not None:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # A search_alg given to Tune is not limited by max_concurrent_trials: limit it here.
            search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.parallel)
        trainable = tune.with_resources(tune.with_parameters(_ray_trainable, job=job), {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            param_space={key: _ray_domain(p) for key, p in spec.space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode="min" if spec.direction == "minimize" else "max", num_samples=n,
                max_concurrent_trials=spec.parallel, search_alg=search_alg,
                # A trial's worker keeps its imports (torch, transformers, mlflow: seconds on a busy
                # node) for the next trial; train() runs trial after trial in one process anyway
                # (the optuna backend does).
                reuse_actors=True,
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{parent_run_id[:8]}",
                storage_path=str(Path(loaded.base_data["output_root"]) / "sweeps" / "ray"),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=1,
            ),
        )
        grid = tuner.fit()
    except BaseException:
        safe_terminate(client, parent_run_id, "KILLED")
        raise
    finally:
        if started_here:
            ray.shutdown()

    keys = list(spec.space)
    records = []
    for result in grid:
        values = {key: result.config.get(key) for key in keys}
        number = trial_number_from_id(Path(result.path).name.removeprefix("trial_")) if result.path else None
        if number is None:
            number = (result.metrics or {}).get("trial_number")
        if result.error is None and spec.metric in (result.metrics or {}):
            records.append(TrialRecord(number, "COMPLETE", values, float(result.metrics[spec.metric]),
                                       result.metrics.get("run_id")))
        else:
            run_id = find_child_run(client, experiment_id, parent_run_id, TAG_TRIAL, str(number))
            error = str(result.error).strip().splitlines()[-1][:1000] if result.error else None
            if run_id is not None:
                close_dead_trial_run(client, run_id, number, error)
            records.append(TrialRecord(number, "FAIL", values, None, run_id, error))
    records.sort(key=lambda r: (r.number is None, r.number))
    from mltrainer.plots import correlation_importance

    complete_records = [(r.values, r.value) for r in records if r.state == "COMPLETE"]
    importances = correlation_importance(complete_records) if len(complete_records) >= 2 else {}
    best = summarize(client, spec, parent_run_id, records, complete=True, importances=importances,
                     importance_method="|correlation|")
    finish_parent(client, parent_run_id, True, best is not None)
    return SweepOutcome(parent_run_id, records, True, best)
