"""Sweep files, fold splitting and the small helpers behind sweep/cv/best (no stack needed)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mltrainer.best import differing_params
from mltrainer.cv import fold_indices, mean_std
from mltrainer.errors import ConfigError
from mltrainer.plots import confusion_matrix, correlation_importance
from mltrainer.config import set_dotted
from mltrainer.sweep import ParamSpec, best_of, load_sweep, parse_param, trial_number_from_id, TrialRecord

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # configs/tiny.yaml's paths are relative to the repository root


def sweep_file(tmp_path: Path, search: dict, **top) -> Path:
    data = {"base": str(REPO / "configs" / "tiny.yaml"), **top,
            "search": {"space": {"training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}},
                       "trials": 2, **search}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path, search=None, **top) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_sweep(sweep_file(tmp_path, search or {}, **top))
    return info.value


def test_valid_sweep_defaults(tmp_path):
    loaded = load_sweep(sweep_file(tmp_path, {}), ["output_root=out"])
    spec = loaded.spec
    assert spec.name == "s" and spec.trials == 2 and spec.metric == "eval_loss" and spec.direction == "minimize"
    assert spec.backend == "optuna" and spec.algorithm == "tpe" and spec.parallel == 1
    assert spec.space["training.learning_rate"] == ParamSpec("training.learning_rate", "float", 1e-4, 1e-3)
    assert Path(loaded.base_data["output_root"]).is_absolute()
    assert load_sweep(sweep_file(tmp_path, {"backend": "ray"})).spec.algorithm == "random"


def test_the_repository_example_is_valid():
    spec = load_sweep(REPO / "configs" / "sweep-tiny.yaml").spec
    assert spec.name == "tiny-sweep" and len(spec.space) == 3


def test_unknown_search_key_names_it(tmp_path):
    exc = error_of(tmp_path, {"trails": 3})
    assert exc.key == "search.trails" and "did you mean trials" in exc.message


def test_unknown_config_key_in_the_space(tmp_path):
    space = {"training.learnin_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}
    exc = error_of(tmp_path, {"space": space})
    assert exc.key == "search.space.training.learnin_rate"
    assert "learning_rate" in exc.message


def test_invalid_value_for_a_config_key(tmp_path):
    exc = error_of(tmp_path, {"space": {"data.max_length": {"type": "int", "low": 0, "high": 4}}})
    assert exc.key == "search.space.data.max_length" and ">= 1" in exc.message


@pytest.mark.parametrize("spec, key, words", [
    ({"type": "float", "low": 1e-3, "high": 1e-4}, "high", "must be >"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "low", "> 0"),
    ({"type": "flot", "low": 0.0, "high": 1.0}, "type", "did you mean float"),
    ({"type": "int", "low": 0.5, "high": 2}, "low", "integer"),
    ({"type": "categorical", "choices": []}, "choices", "non-empty"),
    ({"type": "categorical", "choices": [1], "low": 0}, "low", "does not apply"),
    ({"type": "float", "low": 0.0, "high": 1.0, "choices": [1]}, "choices", "only applies"),
    ({"type": "float", "high": 1.0}, "low", "required"),
    ({"type": "float", "low": 0.0, "high": 1.0, "bogus": 1}, "bogus", "unknown key"),
])
def test_bad_ranges_name_the_key(spec, key, words):
    with pytest.raises(ConfigError) as info:
        parse_param("training.x", spec)
    assert info.value.key == f"search.space.training.x.{key}"
    assert words in info.value.message


@pytest.mark.parametrize("search, key", [
    ({"direction": "down"}, "search.direction"),
    ({"backend": "dask"}, "search.backend"),
    ({"trials": 0}, "search.trials"),
    ({"parallel": 0}, "search.parallel"),
    ({"algorithm": "grid"}, "search.space.training.learning_rate"),  # float without step
    ({"algorithm": "grid", "backend": "ray"}, "search.algorithm"),
    ({"ray_address": "ray://x:1"}, "search.ray_address"),
    ({"backend": "ray", "storage": "x.db"}, "search.storage"),
    ({"space": {}}, "search.space"),
    ({"space": {"experiment.name": {"type": "categorical", "choices": ["a"]}}}, "search.space.experiment.name"),
])
def test_search_errors(tmp_path, search, key):
    assert error_of(tmp_path, search).key == key


def test_backend_only_keys(tmp_path):
    assert "only applies to backend ray (backend is optuna)" in str(error_of(tmp_path, {"ray_address": "ray://x:1"}))
    assert "expected a sqlite file path" in str(error_of(tmp_path, {"storage": " "}))
    spec = load_sweep(sweep_file(tmp_path, {"storage": "study.db"})).spec
    assert spec.storage == str((REPO / "study.db").resolve())


def test_grid_size_and_top_level_errors(tmp_path):
    space = {"training.per_device_train_batch_size": {"type": "categorical", "choices": [8, 16]}}
    assert error_of(tmp_path, {"space": space, "algorithm": "grid", "trials": 3}).key == "search.trials"
    assert error_of(tmp_path, base="nope.yaml").key == "base"
    with pytest.raises(ConfigError) as info:
        load_sweep(sweep_file(tmp_path, {}, extra=1))
    assert info.value.key == "extra"


def test_eval_metric_needs_evaluation(tmp_path):
    exc = error_of(tmp_path, overrides=["training.eval_strategy=no", "checkpoints.monitor=null", "checkpoints.save_top_k=null"])
    assert exc.key == "search.metric"


def test_set_dotted():
    data = {"training": {"a": 1}}
    set_dotted(data, "training.b", 2)
    set_dotted(data, "model.config_overrides.hidden_dropout_prob", 0.2)
    assert data == {"training": {"a": 1, "b": 2}, "model": {"config_overrides": {"hidden_dropout_prob": 0.2}}}
    with pytest.raises(ConfigError):
        set_dotted(data, "training.a.x", 1)


def test_grid_values():
    assert ParamSpec("k", "int", 0, 4, step=2).grid() == [0, 2, 4]
    assert ParamSpec("k", "categorical", choices=("a", "b")).grid() == ["a", "b"]
    assert ParamSpec("k", "float", 0.0, 1.0).grid() is None
    assert ParamSpec("k", "float", 0.0, 1.0, step=0.5).grid() == [0.0, 0.5, 1.0]


def test_best_of_respects_direction_and_failures(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, {})).spec
    records = [TrialRecord(0, "COMPLETE", value=0.5), TrialRecord(1, "FAIL"), TrialRecord(2, "COMPLETE", value=0.3)]
    assert best_of(spec, records).number == 2
    spec_max = load_sweep(sweep_file(tmp_path, {"direction": "maximize"})).spec
    assert best_of(spec_max, records).number == 0
    assert best_of(spec, [TrialRecord(0, "FAIL")]) is None


def test_ray_trial_numbers():
    assert trial_number_from_id("a1b2c_00003") == 3
    assert trial_number_from_id("weird") is None


def test_folds_are_a_deterministic_partition():
    parts = fold_indices(11, 3, seed=7)
    assert parts == fold_indices(11, 3, seed=7)
    assert parts != fold_indices(11, 3, seed=8)
    assert sorted(i for p in parts for i in p) == list(range(11))
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    with pytest.raises(ConfigError):
        fold_indices(2, 3, seed=1)


def test_mean_std_is_population():
    mean, std = mean_std([1.0, 3.0])
    assert mean == 2.0 and std == 1.0


def test_confusion_matrix_and_importance():
    assert confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 2) == [[1, 1], [0, 2]]
    imp = correlation_importance([({"lr": 1.0, "bs": 8}, 1.0), ({"lr": 2.0, "bs": 8}, 2.0),
                                  ({"lr": 3.0, "bs": 8}, 3.0)])
    assert math.isclose(imp["lr"], 1.0) and imp["bs"] == 0.0
    assert correlation_importance([({"lr": 1.0}, 1.0)]) == {}


def test_differing_params():
    runs = [SimpleNamespace(data=SimpleNamespace(params=p)) for p in
            ({"x": "1", "c": "s"}, {"x": "2", "c": "s"}, {"c": "s", "y": "1"})]
    assert differing_params(runs) == ["x", "y"]


@pytest.mark.parametrize("search, key, message", [
    ({"trials": 0}, "search.trials", "must be >= 1, got 0"),
    ({"parallel": "2"}, "search.parallel", "expected an integer, got str '2'"),
    ({"direction": "down"}, "search.direction", "must be one of minimize, maximize, got 'down'"),
    ({"metric": 3}, "search.metric", "expected a non-empty string, got int 3"),
    ({"space": {"training.learning_rate": {"type": "float", "low": 0.1, "high": 1.0, "log": "yes"}}},
     "search.space.training.learning_rate.log", "expected true or false, got str 'yes'"),
])
def test_sweep_files_are_validated_in_the_training_configs_words(tmp_path, search, key, message):
    """A sweep file is checked by the training config's own machinery (config._Section): a wrong
    type or range reads the same in both files."""
    exc = error_of(tmp_path, search)
    assert (exc.key, exc.message) == (key, message) and exc.exit_code == 2


def test_int_bounds_of_a_float_range_are_kept_as_written(tmp_path):
    """``low: 0`` stays 0 in the stored space: a study's identity hash (resuming) depends on it."""
    space = {"training.weight_decay": {"type": "float", "low": 0, "high": 1}}
    spec = load_sweep(sweep_file(tmp_path, {"space": space})).spec
    assert spec.space_json() == '{"training.weight_decay": {"high": 1, "log": false, "low": 0, "type": "float"}}'


def test_ray_cluster_address_from_the_sweep_file_else_ray_address(tmp_path, monkeypatch):
    from mltrainer.sweep.ray_backend import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = load_sweep(sweep_file(tmp_path, {"backend": "ray", "algorithm": "random"})).spec
    assert cluster_address(local) is None  # a local Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address(local) == "10.0.0.5:6379"
    named = load_sweep(sweep_file(tmp_path, {"backend": "ray", "algorithm": "random",
                                             "ray_address": "10.0.0.9:6379"})).spec
    assert cluster_address(named) == "10.0.0.9:6379"  # the sweep file wins
    assert "host:port" in str(error_of(tmp_path, {"backend": "ray", "algorithm": "random", "ray_address": " "}))
