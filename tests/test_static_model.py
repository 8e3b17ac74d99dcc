"""benchmarks/static.py's estimate on a hand-written record (no compile): waves from the resident programs,
the issued work per batch, vit_b's batch beside GRID's, and the assumptions printed with it."""

import math

import pytest

from benchmarks import static


def _record(resident_warps=16, warps=4):
    return {
        "id": "fwd-bf16-d256",
        "kernel": "fwd",
        "dtype": "bf16",
        "d": 256,
        "has_pos": False,
        "source": "triton",
        "warps": warps,
        "resident_warps": resident_warps,
        "tiles": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 128, "D_CHUNKS": 2},
        "loop_mma_flops": {"BF16": 2 * 64 * 32 * 128},
        "nested_mma_flops": {"BF16": 2 * 64 * 32 * 128},
        # what the table prints beside the estimate
        "registers": 128, "spill_stores": 0, "stack_bytes": 0, "shared_bytes": 0, "mma": {"BF16": 8},
        "ffma_in_loops": 0, "ldg_128": 0, "stg_128": 0, "cp_async": 0, "tma": 0,
    }  # fmt: skip


@pytest.mark.parametrize("batch", [static.GRID["B"], static.VIT_B_BATCH, 7])
def test_waves_and_issued_work(batch):
    r = _record()
    e = static.estimate_loss(r, batch)
    programs = batch * math.ceil(static.GRID["masked"] / 64)
    slots = static.GPU.sms * (16 // 4)
    assert e["B"] == batch and e["programs"] == programs
    assert e["waves"] == pytest.approx(programs / slots)
    issued = 2 * 64 * 32 * 128 * 2 * programs * math.ceil(static.GRID["N"] / 32)  # two chunks per iteration
    assert e["issued_flops"] == issued
    peak = dict(static.GPU.mma_flops_per_s)["BF16"]
    assert e["compute_s"] == pytest.approx(issued / peak)
    assert e["occupancy"] == 16 / 64


def test_more_resident_programs_mean_fewer_waves():
    few, many = static.estimate_loss(_record(8)), static.estimate_loss(_record(32))
    assert few["waves"] == pytest.approx(4 * many["waves"])


def test_the_rendered_profile_states_its_assumptions_waves_and_launches():
    r = _record()
    recs = static.with_estimates([r])
    assert recs[0]["estimate_vit_b"]["B"] == static.VIT_B_BATCH
    payload = {
        "tritons": [{"triton": "x", "records": recs}],
        "file": "f.json",
        "commit": "0" * 12,
        "cuda": [],
    }
    text = static.render(payload)
    assert static.ASSUMPTIONS in text and "programs / waves" in text
    assert "1 Triton launches (fwd)" in text and f"at vit_b's {static.VIT_B_BATCH} images per GPU" in text
