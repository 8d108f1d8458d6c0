"""The training case's modes on the command line: checked before anything starts."""

import pytest


def test_modes_default_to_none_until_the_case_knows_its_stack(bench):
    assert bench.parse(["--cases", "train"]).train_modes is None


def test_untracked_runs_first_and_once_whatever_is_asked(bench):
    a = bench.parse(["--train-modes", "apart, ours,none,apart"])
    assert a.train_modes == ["none", "apart", "ours"]


def test_an_unknown_mode_is_refused_by_name(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse(["--train-modes", "ours,aprt"])
    assert exc.value.code == 2
    assert "unknown training mode(s) ['aprt']" in capsys.readouterr().err
