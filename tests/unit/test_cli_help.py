"""``mltrainer --help`` shows the default (train) command's options and lists every subcommand."""

from __future__ import annotations

import pytest

from mltrainer import cli


def help_text(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_help_lists_each_subcommand_with_one_line(capsys):
    text = help_text(capsys, ["--help"])
    assert "--config CONFIG" in text  # the default command's own options are still there
    listed = {line.split()[0]: line for line in text.splitlines()
              if line.startswith("  ") and line.split()[0] in cli.SUBCOMMANDS}
    assert listed.keys() == {"checkpoints", "sweep", "cv", "best"}
    for name, line in listed.items():
        assert line.split(None, 1)[1] == cli.SUBCOMMAND_SUMMARIES[name]
    assert "mltrainer {checkpoints,sweep,cv,best} ..." in text


def test_every_subcommand_has_a_summary_and_a_help_of_its_own(capsys):
    assert cli.SUBCOMMANDS.keys() == cli.SUBCOMMAND_SUMMARIES.keys()
    for name in cli.SUBCOMMANDS:
        assert f"usage: mltrainer {name}" in help_text(capsys, [name, "--help"])
