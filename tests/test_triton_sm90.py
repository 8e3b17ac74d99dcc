"""Every Triton kernel compiles for an H200 (sm_90) here, without a GPU, and its binary meets the budgets of
issue 13: no spill stores and no stack, at least 8 resident warps per SM, shared memory within 227 KB, every
product over bf16/fp16 features on tensor cores (the backward's too), at most 25% of the issued MMA work spent
on padding at N=196 unless the kernel stays memory-bound with it, and the EMA moving 16-byte vectors.

The binaries come from benchmarks/static.py (one compile pass, in a subprocess with TRITON_INTERPRET=0; Triton's
cache shares it with ``python -m benchmarks static``). The installed Triton is always checked; CONMIM_EXTRA_TRITON
names more Triton installs (folders made with ``pip install --target DIR triton==X``, separated by os.pathsep):
.ci/run adds the GPU machine's (3.6), so a kernel that only an older Triton rejects, or spills with, fails too.
Each test is parametrized by kernel and configuration, so a failure names both.
"""

import os

import pytest

from benchmarks import static

pytest.importorskip("triton", reason="triton is not installed")

EXTRA = static.extra_tritons()
CASES = static.cases()
LOSS = [c for c in CASES if c.kernel != "ema"]
LOW_PRECISION = [c for c in LOSS if c.dtype != "fp32"]
EMA = [c for c in CASES if c.kernel == "ema"]


def _params(cases):
    """One parameter per case, named by it."""
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.fixture(scope="module", params=[None, *EXTRA], ids=lambda p: "installed" if p is None else p)
def profile(request):
    """{case id: record with estimate} for one Triton install."""
    out = static.profile_triton(request.param)
    if request.param is not None:
        assert os.path.realpath(out["triton_file"]).startswith(os.path.realpath(request.param)), (
            f"compiled with {out['triton_file']}, not the Triton in {request.param}"
        )
    records = static.with_estimates(out["records"])
    return {r["id"]: r | {"triton": out["triton"]} for r in records}


def test_every_case_compiled(profile):
    assert sorted(profile) == sorted(c.id for c in CASES)


@pytest.mark.parametrize("case", _params(CASES))
def test_no_spills_and_no_stack(profile, case):
    r = profile[case.id]
    assert (r["spill_stores"], r["stack_bytes"], r["local_bytes"]) == (0, 0, 0), (
        f"{case.id} (triton {r['triton']}, {r['registers']} registers): {r['spill_stores']} spill stores, "
        f"{r['stack_bytes']} B stack, {r['local_bytes']} B local memory"
    )


@pytest.mark.parametrize("case", _params(CASES))
def test_shared_memory_fits_and_at_least_8_warps_resident(profile, case):
    r = profile[case.id]
    assert r["shared_bytes"] <= 227 * 1024, f"{case.id}: {r['shared_bytes']} B of shared memory"
    assert r["resident_warps"] >= 8, (
        f"{case.id} (triton {r['triton']}): {r['resident_warps']} resident warps per SM "
        f"({r['warps']} warps, {r['registers']} registers, {r['shared_bytes']} B shared)"
    )


@pytest.mark.parametrize("case", _params(LOW_PRECISION))
def test_every_product_on_tensor_cores(profile, case):
    """Each key-loop iteration issues MMA work for all of the kernel's products (one in the forward, two in
    the backward): an iteration whose MMA FLOPs fall short of the tiles' has a product on FFMA."""
    r = profile[case.id]
    rep = r["estimate"]["replication"]
    assert rep is not None and rep >= 1.0, (
        f"{case.id} (triton {r['triton']}): MMA {r['mma']}, loop MMA FLOPs {r['loop_mma_flops']} cover "
        f"{rep} of the {static.LOSS_KERNELS[case.kernel].products} product(s) per iteration"
    )


@pytest.mark.parametrize("case", _params(LOSS))
def test_padding_at_most_a_quarter_or_memory_bound(profile, case):
    """Issued MMA (or FFMA) work counts padded tiles and warps that repeat each other's work."""
    r = profile[case.id]
    e = r["estimate"]
    assert e["padding"] <= 0.25 or e["memory_bound"], (
        f"{case.id} (triton {r['triton']}): {100 * e['padding']:.0f}% of issued work is padding and the "
        f"kernel is compute-bound by the estimate ({e['compute_s'] * 1e6:.1f} us compute vs "
        f"{e['memory_s'] * 1e6:.1f} us memory)"
    )


@pytest.mark.parametrize("case", _params(EMA))
def test_ema_moves_16_byte_vectors(profile, case):
    r = profile[case.id]
    assert r["ldg_128"] >= 2 and r["stg_128"] >= 1, (
        f"{case.id} (triton {r['triton']}): {r['ldg_128']} of {r['ldg']} loads and {r['stg_128']} of "
        f"{r['stg']} stores are 16-byte vectors"
    )
