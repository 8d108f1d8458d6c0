"""Training and evaluation files whose columns differ: an error that names the setting and the column."""

from pathlib import Path

import pytest

from mltrainer.config import load_config
from mltrainer.errors import ConfigError
from mltrainer.modeling import load_raw_datasets, prepare

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path, train: str, evaluation: str):
    (tmp_path / "train.csv").write_text(train)
    (tmp_path / "eval.csv").write_text(evaluation)
    return load_config(str(REPO / "configs" / "tiny.yaml"),
                       [f"data.files.train={tmp_path / 'train.csv'}", f"data.files.eval={tmp_path / 'eval.csv'}"])


def test_an_evaluation_file_with_other_columns_loads_when_it_has_the_needed_ones(tmp_path):
    cfg = config(tmp_path, "text,label\ngood,1\nbad,0\n", "text,label,source\nfine,1,web\n")
    train, evaluation = load_raw_datasets(cfg)
    assert train.column_names == ["text", "label"] and evaluation.column_names == ["text", "label", "source"]
    assert evaluation["source"] == ["web"]


def test_an_evaluation_file_without_the_text_column_is_named(tmp_path):
    cfg = config(tmp_path, "text,label\ngood,1\nbad,0\n", "sentence,label\nfine,1\n")
    with pytest.raises(ConfigError) as exc:
        load_raw_datasets(cfg)
    assert exc.value.key == "data.text_column"
    assert "column 'text' not in the evaluation data ['sentence', 'label']" in str(exc.value)


def test_an_evaluation_file_without_the_label_column_is_named(tmp_path):
    cfg = config(tmp_path, "text,label\ngood,1\nbad,0\n", "text,stars\nfine,5\n")
    with pytest.raises(ConfigError) as exc:
        prepare(cfg)
    assert exc.value.key == "data.label_column"
    assert "column 'label' not in the evaluation data ['text', 'stars']" in str(exc.value)
