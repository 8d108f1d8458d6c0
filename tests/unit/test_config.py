import json
from pathlib import Path

import pytest
from mltrainer.config import apply_overrides, config_hash, load_config, parse_yaml
from mltrainer.errors import ConfigError
from mltrainer.policy import CheckpointPolicy

BASE = """\
experiment:
  name: sst2
  tags: {team: nlp, version: 2, prod: false}
model:
  name_or_path: prajjwal1/bert-tiny
  task: sequence-classification
  num_labels: 2
data:
  files:
    train: data/train.csv
    eval: data/eval.csv
training:
  learning_rate: 3e-5
  num_train_epochs: 1
  eval_strategy: no
checkpoints:
  upload: every_save
  save_last_k: 2
"""


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch):
    """A config directory with data files; the cwd is somewhere else."""
    d = tmp_path / "cfg"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.csv").write_text("text,label\nhi,1\n")
    (d / "data" / "eval.csv").write_text("text,label\nho,0\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return d


def write(d: Path, text: str, name="train.yaml") -> Path:
    p = d / name
    p.write_text(text)
    return p


def error(cfg_dir, text, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_config(write(cfg_dir, text), overrides)
    return exc.value


def test_load_valid_config(cfg_dir):
    cfg = load_config(write(cfg_dir, BASE))
    assert cfg.experiment.name == "sst2"
    assert cfg.experiment.run_name == "{model}-{task}"
    assert cfg.experiment.tags == {"team": "nlp", "version": "2", "prod": "false"}
    assert cfg.model.name_or_path == "prajjwal1/bert-tiny" and not cfg.model.is_local
    assert cfg.data.files.train == str((cfg_dir / "data" / "train.csv").resolve())
    assert cfg.data.files.format == "csv" and cfg.data.text_column == "text" and cfg.data.max_length == 128
    assert cfg.training == {"learning_rate": 3e-5, "num_train_epochs": 1, "eval_strategy": "no"}
    assert isinstance(cfg.training["learning_rate"], float)
    assert cfg.checkpoints == CheckpointPolicy(save_last_k=2)
    assert (cfg.upload.queue_size, cfg.upload.max_retries, cfg.upload.backoff_seconds) == (2, 5, 1.0)
    assert cfg.upload.background_parts == 1
    assert cfg.tracking.metrics_flush_seconds == 2 and cfg.tracking.system_metrics is True
    assert cfg.output_root == "outputs" and cfg.registered_model is None and cfg.tracking.uri is None
    json.dumps(cfg.to_dict())  # plain data


def test_overrides(cfg_dir):
    cfg = load_config(
        write(cfg_dir, BASE),
        [
            "training.learning_rate=1e-4",
            "training.per_device_train_batch_size=8",
            "checkpoints.save_top_k=1",
            "checkpoints.monitor=loss",
            "registered_model.name=sst2-clf",
            "data.max_train_samples=100",
            "experiment.tags.owner=ana",
            "checkpoints.save_last_k=null",
        ],
    )
    assert cfg.training["learning_rate"] == 1e-4
    assert cfg.training["per_device_train_batch_size"] == 8
    assert cfg.checkpoints.save_top_k == 1 and cfg.checkpoints.save_last_k is None
    assert cfg.registered_model.name == "sst2-clf" and cfg.registered_model.alias == "champion"
    assert cfg.data.max_train_samples == 100
    assert cfg.experiment.tags["owner"] == "ana"


@pytest.mark.parametrize("bad", ["training.learning_rate", "=3", "a..b=1", ".a=1"])
def test_malformed_override(cfg_dir, bad):
    err = error(cfg_dir, BASE, [bad])
    assert f"malformed override {bad!r}" in str(err)


def test_override_through_scalar(cfg_dir):
    err = error(cfg_dir, BASE, ["experiment.name.x=1"])
    assert err.key == "experiment.name" and "needs a mapping here" in str(err)


def test_yaml_dialect():
    assert parse_yaml("a: 3e-5\nb: no\nc: on\nd: TRUE\ne: 1e3\nf: -2.5E-4\ng: '3e-5'") == {
        "a": 3e-5, "b": "no", "c": "on", "d": True, "e": 1000.0, "f": -2.5e-4, "g": "3e-5",
    }  # fmt: skip


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file_and_line(cfg_dir):
    err = error(cfg_dir, "experiment:\n  name: x\nmodel: [oops\n")
    assert err.key is None
    assert f"{cfg_dir / 'train.yaml'}:4:1: invalid YAML" in str(err)


def test_duplicate_key_is_an_error(cfg_dir):
    err = error(cfg_dir, BASE + "output_root: a\noutput_root: b\n")
    assert "found duplicate key 'output_root'" in str(err)


@pytest.mark.parametrize("text", ["", "- a\n- b\n"])
def test_empty_or_non_mapping(cfg_dir, text):
    assert "config file" in str(error(cfg_dir, text))


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ("experimnt: {}\n", "experimnt", "unknown key; did you mean experiment?"),
        ("upload: {queue_sise: 3}\n", "upload.queue_sise", "did you mean queue_size?"),
        ("upload: {queue_size: true}\n", "upload.queue_size", "expected an integer, got bool True"),
        ("upload: {queue_size: 0}\n", "upload.queue_size", "must be >= 1, got 0"),
        ("upload: {background_parts: 0}\n", "upload.background_parts", "must be >= 1, got 0"),
        ("tracking: {metrics_flush_seconds: -1}\n", "tracking.metrics_flush_seconds", "must be >= 0, got -1"),
        ("tracking: {system_metrics: 'no'}\n", "tracking.system_metrics", "expected true or false, got str 'no'"),
        ("upload: {backoff_seconds: fast}\n", "upload.backoff_seconds", "expected a number, got str 'fast'"),
        ("output_root: 3\n", "output_root", "expected a non-empty string, got int 3"),
        ("registered_model: {alias: best}\n", "registered_model.name", "is required"),
        ("registered_model: {name: m, alias: v2}\n", "registered_model.alias", "not a valid MLflow alias"),
        ("tracking: {uri: 'http://u:pw@host:5000'}\n", "tracking.uri", "must not contain a password"),
        ("checkpoints2: {}\n", "checkpoints2", "did you mean checkpoints?"),
    ],
)
def test_top_level_errors(cfg_dir, extra, key, fragment):
    err = error(cfg_dir, BASE + extra)
    assert err.key == key
    assert fragment in str(err)
    assert str(err).startswith(f"{cfg_dir / 'train.yaml'}: {key}: ")


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        (
            "training.learnin_rate=1",
            "training.learnin_rate",
            "unknown TrainingArguments field; did you mean learning_rate?",
        ),
        ("training.output_dir=x", "training.output_dir", "use output_root"),
        ("checkpoints.save_top_k=2", "checkpoints.save_top_k", "needs checkpoints.monitor"),
        ("checkpoints.path_template={epoch}", "checkpoints.path_template", "must contain {step}"),
        ("model.task=regression", "model.task", "must be one of sequence-classification, causal-lm"),
        ("model.task=causal_lm", "model.task", "did you mean causal-lm?"),
        ("model.num_labels=two", "model.num_labels", "expected an integer"),
        ("model.from_config=yes", "model.from_config", "expected true or false, got str 'yes'"),
        ("model.name_or_path=./missing-model", "model.name_or_path", "path './missing-model' does not exist"),
        ("model.name_or_path=not a hub id!", "model.name_or_path", "neither an existing local path nor"),
        ("model.config_overrides=3", "model.config_overrides", "expected a mapping"),
        ("experiment.name=null", "experiment.name", "is required"),
        ("experiment.run_name={model}-{when}", "experiment.run_name", "unknown field {when}"),
        ("experiment.tags.x=[1]", "experiment.tags.x", "tag values must be scalars"),
        ("data.files.train=data/nope.csv", "data.files.train", "path 'data/nope.csv' does not exist"),
        ("data.files.train=data", "data.files.train", "is not a file"),
        ("data.files.format=tsv", "data.files.format", "must be one of csv, json, parquet"),
        ("data.max_length=0", "data.max_length", "must be >= 1"),
        ("data.hub.name=glue", "data", "set exactly one of data.hub"),
        ("data.files.extra=1", "data.files.extra", "unknown key"),
    ],
)
def test_field_errors(cfg_dir, override, key, fragment):
    err = error(cfg_dir, BASE, [override])
    assert err.key == key
    assert fragment in str(err)


def test_num_labels_only_for_classification(cfg_dir):
    err = error(cfg_dir, BASE, ["model.task=causal-lm"])
    assert err.key == "model.num_labels" and "only applies to task sequence-classification" in str(err)


def test_missing_sections(cfg_dir):
    err = error(cfg_dir, "experiment: {name: x}\n")
    assert err.key == "model" and "section is required" in str(err)


def test_missing_path_lists_where_it_looked(cfg_dir):
    err = error(cfg_dir, BASE, ["data.files.eval=nope.csv"])
    assert str(Path.cwd() / "nope.csv") in str(err) and str(cfg_dir / "nope.csv") in str(err)


def test_relative_paths_prefer_cwd(cfg_dir, tmp_path):
    (Path.cwd() / "data").mkdir()
    (Path.cwd() / "data" / "train.csv").write_text("text,label\n")
    cfg = load_config(write(cfg_dir, BASE))
    assert cfg.data.files.train == str((Path.cwd() / "data" / "train.csv").resolve())
    assert cfg.data.files.eval == str((cfg_dir / "data" / "eval.csv").resolve())  # falls back to config dir


def test_local_model_and_format_inference(cfg_dir):
    (cfg_dir / "tiny-model").mkdir()
    (cfg_dir / "data" / "train.jsonl").write_text('{"text": "a", "label": 1}\n')
    cfg = load_config(
        write(cfg_dir, BASE),
        ["model.name_or_path=tiny-model", "model.from_config=true", "model.config_overrides.hidden_size=32",
         "data.files.train=data/train.jsonl", "data.files.eval=null"],
    )  # fmt: skip
    assert cfg.model.is_local and cfg.model.name_or_path == str((cfg_dir / "tiny-model").resolve())
    assert cfg.model.from_config is True and cfg.model.config_overrides == {"hidden_size": 32}
    assert cfg.data.files.format == "json"


def test_mixed_file_formats_rejected(cfg_dir):
    (cfg_dir / "data" / "eval.parquet").write_bytes(b"")
    err = error(cfg_dir, BASE, ["data.files.eval=data/eval.parquet"])
    assert err.key == "data.files.eval" and "different format" in str(err)


def test_eval_monitor_needs_eval_schedule_and_data(cfg_dir):
    err = error(cfg_dir, BASE, ["checkpoints.monitor=eval_loss"])
    assert err.key == "checkpoints.monitor" and "training.eval_strategy" in str(err)
    err = error(
        cfg_dir, BASE, ["checkpoints.monitor=eval_loss", "training.eval_strategy=steps", "data.files.eval=null"]
    )
    assert err.key == "checkpoints.monitor" and "needs evaluation data" in str(err)
    cfg = load_config(write(cfg_dir, BASE), ["checkpoints.monitor=eval_loss", "training.eval_strategy=steps"])
    assert cfg.checkpoints.monitor == "eval_loss"


def test_hub_data(cfg_dir):
    text = BASE.replace(
        "  files:\n    train: data/train.csv\n    eval: data/eval.csv\n",
        "  hub: {name: glue, config: sst2, split_eval: validation}\n",
    )
    cfg = load_config(write(cfg_dir, text))
    assert cfg.data.files is None
    assert (cfg.data.hub.name, cfg.data.hub.config, cfg.data.hub.split_train, cfg.data.hub.split_eval) == (
        "glue", "sst2", "train", "validation",
    )  # fmt: skip


def test_config_hash_is_stable_across_files_and_sensitive_to_values(cfg_dir):
    a = load_config(write(cfg_dir, BASE))
    b = load_config(write(cfg_dir, BASE, name="copy.yaml"))
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12 and all(c in "0123456789abcdef" for c in config_hash(a))
    c = load_config(write(cfg_dir, BASE), ["training.learning_rate=4e-5"])
    assert config_hash(c) != config_hash(a)


def test_config_hash_ignores_key_order(cfg_dir):
    text = BASE.replace(
        "  learning_rate: 3e-5\n  num_train_epochs: 1\n", "  num_train_epochs: 1\n  learning_rate: 3e-5\n"
    )
    assert text != BASE
    assert config_hash(load_config(write(cfg_dir, text))) == config_hash(load_config(write(cfg_dir, BASE)))


def test_run_name(cfg_dir):
    from datetime import datetime, timezone

    cfg = load_config(write(cfg_dir, BASE), ["experiment.run_name={model}-{task}-{timestamp}"])
    when = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert cfg.run_name(when) == "bert-tiny-sequence-classification-20250304-050607"


def test_apply_overrides_values():
    assert apply_overrides({}, ["a.b.c=1", "a.d=x y", "e={epoch}-{step}", "f=[1, 2]", "g=", "h=a=b", "i=[1"]) == {
        "a": {"b": {"c": 1}, "d": "x y"}, "e": "{epoch}-{step}", "f": [1, 2], "g": None, "h": "a=b", "i": "[1",
    }  # fmt: skip


def test_error_without_source_when_built_in_memory():
    from mltrainer.config import build_config

    with pytest.raises(ConfigError) as exc:
        build_config({"experiment": {"name": "x"}, "model": {}, "data": {}})
    assert str(exc.value) == "model.task: is required"
    assert exc.value.source is None


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_is_valid_for_the_pinned_libraries(path, tmp_path):
    """The README and the compose file point users at these; a key the pinned transformers no
    longer knows (it dropped warmup_ratio) must fail here, not on a user's GPU."""
    from mltrainer.sweep import load_sweep

    data = parse_yaml(path.read_text(), source=str(path))
    if "search" in data:
        assert load_sweep(path).spec.name
        return
    overrides = []
    model = data["model"]["name_or_path"]
    if model.startswith(".models/") and not Path(model).exists():
        # `make demo` exports that model there; a clean clone has not run it yet.
        (tmp_path / "model").mkdir()
        overrides.append(f"model.name_or_path={tmp_path / 'model'}")
    assert load_config(str(path), overrides).experiment.name


def test_configs_are_found():
    assert {"tiny.yaml", "gpu-example.yaml", "sweep-tiny.yaml"} <= {p.name for p in SHIPPED}


# -- names the server and the store can hold (limits.py), checked before any run ------------------


@pytest.mark.parametrize(
    ("overrides", "key", "needle"),
    [
        (["experiment.run_name=.."], "experiment.run_name", "renders '..', which leaves nothing"),
        (["experiment.run_name=" + "r" * 300], "experiment.run_name",
         "the rendered run name is 300 characters long; MLflow's database holds at most 250"),
        # The rendered name counts, not the template: {experiment} brings 245 characters.
        (["experiment.name=" + "e" * 245, "experiment.run_name={experiment}-{timestamp}"], "experiment.run_name",
         "is 261 characters long"),
        (["experiment.name=" + "e" * 300], "experiment.name", "holds at most 256"),
        (["registered_model.name=team/model"], "registered_model.name", "contains '/' or ':'"),
        (["registered_model.name=" + "m" * 257], "registered_model.name", "holds at most 256"),
        (["checkpoints.path_template=" + "c" * 250 + "-{step}"], "checkpoints.path_template",
         "at most 255 per component"),
    ],
)
def test_names_too_long_or_empty_are_refused_at_load(cfg_dir, overrides, key, needle):
    err = error(cfg_dir, BASE, overrides)
    assert err.key == key and needle in str(err), str(err)


def test_run_name_at_the_limit_loads(cfg_dir):
    cfg = load_config(write(cfg_dir, BASE), ["experiment.run_name=" + "r" * 250])
    assert len(cfg.run_name()) == 250


# -- metrics the checkpoint policy names must be ones the run logs at a save (monitor.py) ---------


@pytest.mark.parametrize(
    ("overrides", "key", "needle"),
    [
        (["checkpoints.monitor=eval_los", "training.eval_strategy=steps"], "checkpoints.monitor",
         "'eval_los' is not a metric this trainer logs; did you mean eval_loss?"),
        (["checkpoints.monitor=eval_accuracy", "training.eval_strategy=steps"], "checkpoints.monitor",
         "is not a metric this trainer logs"),
        (["checkpoints.monitor=train_loss"], "checkpoints.monitor", "logged only when training ends, after the last save"),
        (["checkpoints.path_template={eval_f1}-{step}", "training.eval_strategy=steps"], "checkpoints.path_template",
         "'eval_f1' is not a metric this trainer logs"),
        (["checkpoints.path_template={eval_loss:.3f}-{step}"], "checkpoints.path_template",
         "training.eval_strategy"),
    ],
)
def test_policy_metrics_the_run_never_logs_are_refused(cfg_dir, overrides, key, needle):
    err = error(cfg_dir, BASE, overrides)
    assert err.key == key and needle in str(err), str(err)


def test_policy_metrics_the_run_logs_load(cfg_dir):
    cfg = load_config(write(cfg_dir, BASE), ["checkpoints.monitor=loss", "checkpoints.save_top_k=1"])
    assert cfg.checkpoints.monitor == "loss"
    cfg = load_config(write(cfg_dir, BASE), ["training.eval_strategy=steps", "checkpoints.monitor=eval_loss",
                                             "checkpoints.path_template={eval_loss:.4f}-{step}"])
    assert cfg.checkpoints.path_template == "{eval_loss:.4f}-{step}"


# -- a run that would train nothing is refused at load (transformers runs one step for max_steps 0) ---


@pytest.mark.parametrize(
    ("override", "key", "needle"),
    [
        ("training.max_steps=0", "training.max_steps", "must be a positive number of steps, or -1"),
        ("training.max_steps=-5", "training.max_steps", "got -5"),
        ("training.max_steps=ten", "training.max_steps", "got 'ten'"),
        ("training.num_train_epochs=0", "training.num_train_epochs", "must be a number above 0"),
    ],
)
def test_training_length_of_nothing_is_refused(cfg_dir, override, key, needle):
    err = error(cfg_dir, BASE, [override])
    assert err.key == key and key in str(err) and needle in str(err), str(err)


def test_training_length_that_trains_loads(cfg_dir):
    assert load_config(write(cfg_dir, BASE), ["training.max_steps=1"]).training["max_steps"] == 1
    # -1 (transformers' "unset") with epochs, and a step budget that makes epochs irrelevant.
    assert load_config(write(cfg_dir, BASE), ["training.max_steps=-1"]).training["max_steps"] == -1
    cfg = load_config(write(cfg_dir, BASE), ["training.num_train_epochs=0", "training.max_steps=4"])
    assert cfg.training["max_steps"] == 4
