"""Help for every option of conmim-train, conmim-export, conmim-eval and conmim-info."""

import argparse

import pytest

from conmim import evaluate, export, info, train

PARSERS = {"conmim-train": train, "conmim-export": export, "conmim-eval": evaluate, "conmim-info": info}


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_option_has_help(prog):
    p = PARSERS[prog].parser()
    assert p.prog == prog and p.description
    for action in p._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and len(action.help) > 10, f"{prog} {action.dest} has no help"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_help_prints_usage_and_exits(prog, capsys):
    with pytest.raises(SystemExit) as exc:
        PARSERS[prog].main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog}")
    for action in PARSERS[prog].parser()._actions:
        assert all(s in out for s in action.option_strings)
    assert "backends (auto takes" not in out  # conmim-info --help does not run the report
