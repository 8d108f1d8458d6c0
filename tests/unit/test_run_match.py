"""``--resume latest`` matches run names exactly (mltrainer/run_match.py, TrainConfig.run_name_pattern)."""

from __future__ import annotations

import re

import pytest

from mltrainer.config import RUN_NAME_TIMESTAMP_REGEX, load_config
from mltrainer.run_match import RunNamePattern


def pattern(name_with_ts: str) -> RunNamePattern:
    return RunNamePattern.from_rendered(name_with_ts, "<TS>", RUN_NAME_TIMESTAMP_REGEX)


@pytest.mark.parametrize("name, other", [
    ("bert_v1", "bertXv1"),       # '_' is LIKE's one-character wildcard
    ("run%1", "run-anything-1"),  # '%' is LIKE's any-string wildcard
    ("a\\_b", "a\\Xb"),
    ("it's", "itXs"),
])
def test_wildcard_characters_match_only_themselves(name, other):
    p = pattern(name)
    assert p.matches(name)
    assert not p.matches(other)
    assert not p.matches(name + "-2")


def test_timestamp_is_the_only_open_part():
    p = pattern("tiny_bert-<TS>-x%y")
    assert p.matches("tiny_bert-20260101-120000-x%y")
    assert not p.matches("tiny_bert-2026-x%y")
    assert not p.matches("tinyXbert-20260101-120000-x%y")


def test_like_pattern_matches_at_least_every_exact_name():
    """The server is asked with ``like()``: it may over-match (we filter) but never miss a run."""
    for name in ["bert_v1", "run%1", "a\\b", "it's", "plain-name"]:
        like = pattern(name + "-<TS>").like()
        regex = "".join("." if c == "_" else ".*" if c == "%" else re.escape(c) for c in like)
        assert re.fullmatch(regex, f"{name}-20260101-120000"), (name, like)
        assert "'" not in like and "\\" not in like


def test_config_pattern_from_template(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["experiment.run_name=my_{model}-{timestamp}%"])
    p = cfg.run_name_pattern()
    assert p.matches(cfg.run_name())
    assert p.matches("my_tiny-bert-20250101-000000%")
    assert not p.matches("myXtiny-bert-20250101-000000%")
    assert not p.matches("my_tiny-bert-20250101-000000%-copy")
    assert p.search_filter() == "attributes.run_name LIKE 'my_tiny-bert-%_'"
