"""conmim-train on tar shards over 2 gloo ranks: 3 shards for 2 ranks (not divisible), every image once per
epoch across the ranks, and a run killed mid-epoch that resumes to the uninterrupted run's checkpoint, bit for bit.
"""

import os
import subprocess

import pytest

from conmim import checkpoint as ckpt
from conmim.shards import write_shards
from tests.conftest import dcp_tensors
from tests.test_scaleout import torchrun_cmd
from tests.test_train import assert_identical, kill_once_checkpointed

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 2 epochs of 2 optimizer steps (32 digits, 2 ranks x 8), checkpointed after every step, images recorded
RUN = ("--epochs", "2", "--checkpoint_every", "1", "--keep_last", "4", "--record_samples", "true")


@pytest.fixture(scope="module")
def digit_shards(digits, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "sh"
    total = sum(p.stat().st_size for p in digits.rglob("*.png"))
    index = write_shards(digits, out, shard_bytes=total // 3 + 1, seed=1, verbose=False)
    assert len(index["shards"]) == 3 and index["samples"] == 32
    return index["pattern"]


def _run(cmd) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_ranks_on_three_shards_resume_bit_for_bit(digit_shards, tmp_path):
    whole = tmp_path / "whole"
    _run(torchrun_cmd(digit_shards, whole, *RUN))
    for epoch in (0, 1):
        seen = [
            [int(i) for i in (whole / f"samples-e{epoch:04d}-r{rank}.txt").read_text().split()]
            for rank in (0, 1)
        ]
        assert len(seen[0]) == len(seen[1]) == 16
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(32))
    out = tmp_path / "killed"
    killed_at = kill_once_checkpointed(
        torchrun_cmd(digit_shards, out, *RUN), lambda: ckpt.checkpoints(out), 1
    )
    assert 1 <= killed_at < 4, "the run must be killed in the middle"
    r = _run(torchrun_cmd(digit_shards, out, *RUN))
    assert f"step {killed_at})" in r.stderr
    assert_identical(*(dcp_tensors(ckpt.checkpoints(run)[0]) for run in (out, whole)))
    for epoch in (0, 1):  # the resumed run's ranks saw the same images as the uninterrupted one's
        for rank in (0, 1):
            name = f"samples-e{epoch:04d}-r{rank}.txt"
            assert (out / name).read_text().split()[-8:] == (whole / name).read_text().split()[-8:]
