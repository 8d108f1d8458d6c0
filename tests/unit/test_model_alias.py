"""One rule for a model version's alias: the config and ``mltrainer best --alias`` refuse the same ones alike."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mltrainer.config import build_config
from mltrainer.errors import ConfigError
from mltrainer.limits import model_alias_problem

BASE = {"experiment": {"name": "e"}, "model": {"name_or_path": "org/m", "task": "causal-lm"},
        "data": {"hub": {"name": "d"}}}


@pytest.mark.parametrize("alias", ["V10", "latest", "dot.ted"])
def test_config_and_best_command_refuse_an_alias_with_the_same_reason(tmp_path, alias):
    problem = model_alias_problem(alias)
    assert problem is not None and "not a valid MLflow alias" in problem
    with pytest.raises(ConfigError) as exc:
        build_config({**BASE, "registered_model": {"name": "m", "alias": alias}})
    assert str(exc.value) == f"registered_model.alias: {problem}"

    # a tracking URI nothing listens on: the alias is refused before any request
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "mltrainer.cli", "best", "--experiment", "e", "--metric", "m",
                           "--mode", "min", "--register", "m", "--alias", alias],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--alias: {problem}" in proc.stderr


@pytest.mark.parametrize("alias", ["champion", "v2-candidate", "best_1", "version2"])
def test_valid_aliases_pass(alias):
    assert model_alias_problem(alias) is None
    cfg = build_config({**BASE, "registered_model": {"name": "m", "alias": alias}})
    assert cfg.registered_model.alias == alias

