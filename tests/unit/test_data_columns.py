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


@pytest.mark.parametrize("evaluation, key, message", [
    ("sentence,label\nfine,1\n", "data.text_column", "column 'text' not in the evaluation data ['sentence', 'label']"),
    ("text,stars\nfine,5\n", "data.label_column", "column 'label' not in the evaluation data ['text', 'stars']"),
])
def test_an_evaluation_file_without_a_needed_column_is_named(tmp_path, evaluation, key, message):
    cfg = config(tmp_path, "text,label\ngood,1\nbad,0\n", evaluation)
    with pytest.raises(ConfigError) as exc:
        prepare(cfg)
    assert exc.value.key == key and message in str(exc.value)
