"""benchmarks/mutate.py: every planted bug still matches its source, planting never touches the working tree, and
(slow layer) the CPU tests kill every mutant."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import mutate

ROOT = Path(__file__).resolve().parents[1]


def test_at_least_twenty_mutants_and_each_still_plants():
    assert len(mutate.MUTANTS) >= 20
    assert len({m.name for m in mutate.MUTANTS}) == len(mutate.MUTANTS)
    for m in mutate.MUTANTS:
        text = (ROOT / m.path).read_text()
        planted = mutate.plant(text, m)
        assert planted != text and m.new in planted, m.name


def test_a_mutant_that_no_longer_matches_is_an_error():
    m = mutate.Mutant("gone", "kernels/ema.py", "no such text", "x", ())
    with pytest.raises(ValueError, match="no longer contains"):
        mutate.plant("source", m)


@pytest.mark.slow
def test_every_mutant_is_killed(tmp_path):
    before = {p: p.read_bytes() for m in mutate.MUTANTS for p in [ROOT / m.path]}
    out = tmp_path / "mutants.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "mutate", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3 * 3600,
    )
    assert {p: p.read_bytes() for p in before} == before, "mutate modified the working tree"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
