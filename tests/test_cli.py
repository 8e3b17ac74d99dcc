"""Help for every option of conmim-train, conmim-export, conmim-eval and conmim-info."""

import argparse
import os
import re
from pathlib import Path

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


def _readme_help_blocks() -> dict[str, str]:
    """README's ```text blocks that start with ``$ PROG --help``: PROG -> the text below that line."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```text\n\$ (\S+) --help\n(.*?)```", text, flags=re.S)
    return dict(blocks)


def help_text(prog: str) -> str:
    """The help as the README shows it: formatted for a 100-column terminal."""
    os.environ["COLUMNS"] = "100"
    try:
        return PARSERS[prog].parser().format_help()
    finally:
        del os.environ["COLUMNS"]


@pytest.mark.parametrize("prog", sorted(set(PARSERS) - {"conmim-train"}))
def test_readme_shows_the_current_help(prog):
    """Compared word by word: argparse's line wrapping varies a little between Python versions."""
    shown = _readme_help_blocks().get(prog, "")
    assert shown.split() == help_text(prog).split(), (
        f"README's `{prog} --help` block is out of date: paste `COLUMNS=100 {prog} --help`"
    )
