"""The optuna backend: trials run in this process, the study in a database that makes sweeps resumable.

The study (by default ``<output_root>/sweeps/<name>.db``) remembers its parent run id and a hash
of what defines the search, so running the same sweep again continues it, and a changed sweep
is refused instead of mixing two searches in one study.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mltrainer.errors import ConfigError

from .parent import SweepOutcome, TrialRecord, create_parent, finish_parent, safe_terminate, summarize
from .space import ParamSpec
from .spec import LoadedSweep, SweepSpec
from .tags import TAG_SWEEP_STATE, TAG_TRIAL
from .trial import TrialJob, find_child_run, run_trial

logger = logging.getLogger(__name__)

# Study attributes: the parent run a study belongs to, and what must not change between sessions.
PARENT_ATTR = "mlflow_parent_run_id"
SPEC_HASH_ATTR = "mltrainer_spec_hash"


def storage_url(spec: SweepSpec, output_root: str) -> str:
    if spec.storage and "://" in spec.storage:
        return spec.storage
    path = Path(spec.storage) if spec.storage else Path(output_root) / "sweeps" / f"{spec.name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _optuna_sampler(spec: SweepSpec):
    import optuna

    if spec.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.algorithm == "grid":
        return optuna.samplers.GridSampler({k: p.grid() for k, p in spec.space.items()}, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def suggest(trial, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(param.key, list(param.choices))
    if param.type == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(param.key, float(param.low), float(param.high), step=param.step, log=param.log)


def run_optuna(loaded: LoadedSweep, client, *, max_trials: int | None, fresh: bool) -> SweepOutcome:
    import optuna
    from optuna.trial import TrialState

    spec = loaded.spec
    url = storage_url(spec, loaded.base_data["output_root"])
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                         if url.startswith("sqlite") else {})
    if fresh:
        try:
            optuna.delete_study(study_name=spec.name, storage=storage)
            logger.info("--fresh: deleted study %s from %s", spec.name, url)
        except KeyError:
            pass
    direction = spec.direction
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=direction,
                                sampler=_optuna_sampler(spec), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError("search.direction", f"study {spec.name!r} in {url} was created with direction "
                                              f"{study.direction.name.lower()}; use --fresh or another name")
    from mltrainer import tracking

    experiment_id = tracking.get_or_create_experiment(client, loaded.base_cfg.experiment.name)
    attrs = study.user_attrs
    if attrs.get(SPEC_HASH_ATTR) not in (None, spec.identity_hash()):
        raise ConfigError("search", f"the sweep changed since study {spec.name!r} was created in {url} "
                                    "(base config, overrides, space, metric, direction or algorithm); "
                                    "run with --fresh to start over, or give the sweep another name")
    parent_run_id = attrs.get(PARENT_ATTR)
    if parent_run_id:
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as exc:
            raise ConfigError("search", f"study {spec.name!r} in {url} belongs to parent run {parent_run_id}, "
                                        f"which cannot be read ({exc}); run with --fresh to start over") from None
        if parent.info.lifecycle_stage != "active":
            raise ConfigError("search", f"the parent run {parent_run_id} of study {spec.name!r} was deleted; "
                                        "run with --fresh to start over")
        experiment_id = parent.info.experiment_id
        client.update_run(parent_run_id, status="RUNNING")
        logger.info("continuing sweep %s: parent run %s, study in %s", spec.name, parent_run_id, url)
    else:
        parent_run_id = create_parent(client, loaded, experiment_id)
        study.set_user_attr(PARENT_ATTR, parent_run_id)
        study.set_user_attr(SPEC_HASH_ATTR, spec.identity_hash())
        logger.info("sweep %s: parent run %s, study in %s", spec.name, parent_run_id, url)

    # Trials cut off by an interruption: failed (and not counted), their runs marked KILLED.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        run_id = t.user_attrs.get("run_id") or find_child_run(client, experiment_id, parent_run_id, TAG_TRIAL,
                                                              str(t.number))
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        logger.warning("trial %d was interrupted in an earlier session: marked failed, not counted", t.number)

    def counted(trials) -> int:
        return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))

    done = counted(study.get_trials(deepcopy=False))
    remaining = max(0, spec.trials - done)
    to_run = remaining if max_trials is None else min(remaining, max_trials)
    logger.info("sweep %s: %d of %d trials done, running %d now", spec.name, done, spec.trials, to_run)
    job = TrialJob(spec.name, loaded.base_data, loaded.config_dir, parent_run_id, experiment_id, spec.metric,
                   tuple(spec.space))

    def objective(trial):
        values = {key: suggest(trial, param) for key, param in spec.space.items()}
        try:
            value, run_id = run_trial(job, trial.number, values)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            logger.error("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise
        trial.set_user_attr("run_id", run_id)
        return value

    client.set_tag(parent_run_id, TAG_SWEEP_STATE, "running")
    try:
        if to_run:
            study.optimize(objective, n_trials=to_run, n_jobs=spec.parallel, catch=(Exception,))
    except BaseException:
        safe_terminate(client, parent_run_id, "KILLED")
        raise

    records = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("interrupted") or t.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        run_id = t.user_attrs.get("run_id")
        if run_id is None and t.state == TrialState.FAIL:
            run_id = find_child_run(client, experiment_id, parent_run_id, TAG_TRIAL, str(t.number))
        records.append(TrialRecord(t.number, t.state.name, dict(t.params), t.value, run_id, t.user_attrs.get("error")))
    complete = counted(study.get_trials(deepcopy=False)) >= spec.trials
    importances, method = optuna_importances(study, records)
    best = summarize(client, spec, parent_run_id, records, complete=complete, importances=importances,
                     importance_method=method)
    finish_parent(client, parent_run_id, complete, best is not None)
    return SweepOutcome(parent_run_id, records, complete, best)


def optuna_importances(study, records: Sequence[TrialRecord]) -> tuple[dict[str, float], str]:
    complete = [r for r in records if r.state == "COMPLETE" and r.value is not None]
    if len(complete) < 2:
        return {}, ""
    try:
        import optuna

        return dict(optuna.importance.get_param_importances(study)), "optuna fANOVA"
    except Exception as exc:  # noqa: BLE001 - e.g. no parameter varied yet
        logger.info("optuna importance not available (%s); using correlation", exc)
        from mltrainer.plots import correlation_importance

        return correlation_importance([(r.values, r.value) for r in complete]), "|correlation|"
