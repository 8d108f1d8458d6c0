"""Entry point: run a loaded sweep on its backend."""

from __future__ import annotations

import logging

from .optuna_backend import run_optuna
from .parent import SweepOutcome
from .ray_backend import run_ray
from .spec import LoadedSweep

logger = logging.getLogger(__name__)


def run_sweep(loaded: LoadedSweep, *, max_trials: int | None = None, fresh: bool = False) -> SweepOutcome:
    from mltrainer import tracking

    client = tracking.client_for(loaded.base_cfg)
    tracking.check_server(client)
    if loaded.spec.backend == "ray":
        if fresh:
            logger.info("--fresh has no effect with backend ray: every ray sweep starts fresh")
        return run_ray(loaded, client, max_trials=max_trials)
    return run_optuna(loaded, client, max_trials=max_trials, fresh=fresh)
