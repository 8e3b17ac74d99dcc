"""The CUDA kernels of the built extension meet issue 13's static budgets on sm_90, read from the binary without a
GPU (benchmarks/static.py's ``profile_cuda``: cuobjdump's resource usage and SASS of ``conmim/_C*.so``): no stack
and no spill stores in any kernel; every product of a loss kernel on tensor cores for every (student, teacher)
pair but fp32 with fp32, the backward's gradient products included (before the rebuild bwd_q and bwd_k issued only
the forward's 4 HMMA of the logits recompute and computed G K and G^T Q on FFMA; mixed pairs ran everything on
FFMA); the EMA moving both tensors in 16-byte vectors for every dtype pair (bf16/fp16 moved 4 or 8 bytes at a
time before); the loss kernels' static shared memory as the launchers' plan counts it (csrc/cuda smem_plan).
One test per kernel, so a failure names it.
"""

import re

import pytest
import torch

from benchmarks import static
from conmim import _ext

pytestmark = pytest.mark.skipif(
    "90" not in _ext.cuda_archs(), reason="conmim._C was built without sm_90 CUDA kernels"
)

KERNELS = {r["kernel"]: r for r in static.profile_cuda()} if "90" in _ext.cuda_archs() else {}
_LOSS = re.compile(r"void (fwd|bwd_q|bwd_k)_kernel<(\w+), (\w+)>")
_EMA = re.compile(r"void ema_kernel<(\w+), (\w+)>")
DTYPES = {"float": torch.float32, "__nv_bfloat16": torch.bfloat16, "__half": torch.float16}
# MMA instructions per kernel: the logits (4 HMMA in each kernel for a bf16/fp16 pair, 4 TF32 steps for a mixed
# pair) plus, in the backward, the gradient product as TF32 MMA over the hi/lo split of G.
MIN_MMA = {"fwd": 4, "bwd_q": 8, "bwd_k": 8}


def _loss_kernels(on_tensor_cores: bool) -> list[str]:
    """The loss kernels of every pair but fp32 with fp32 (True), or all of them (False)."""
    out = []
    for name in KERNELS:
        m = _LOSS.fullmatch(name)
        if m and not (on_tensor_cores and m.group(2) == m.group(3) == "float"):
            out.append(name)
    return sorted(out)


def test_every_kernel_family_is_in_the_binary():
    families = {name.split("<")[0] for name in KERNELS}
    assert families >= {"void fwd_kernel", "void bwd_q_kernel", "void bwd_k_kernel", "void ema_kernel"}, (
        families
    )
    assert len(_loss_kernels(True)) == 24 and len([k for k in KERNELS if _EMA.fullmatch(k)]) == 9


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_no_stack_and_no_spills(kernel):
    r = KERNELS[kernel]
    assert (r["stack_bytes"], r["local_bytes"], r["spill_stores"]) == (0, 0, 0), (
        f"{kernel} ({r['registers']} registers): {r['stack_bytes']} B stack, {r['local_bytes']} B local, "
        f"{r['spill_stores']} spill stores"
    )


@pytest.mark.parametrize("kernel", _loss_kernels(True))
def test_loss_products_on_tensor_cores(kernel):
    r = KERNELS[kernel]
    which = _LOSS.fullmatch(kernel).group(1)
    assert r["hmma"] + r["hgmma"] >= MIN_MMA[which], (
        f"{kernel}: {r['hmma']} HMMA / {r['hgmma']} HGMMA ({r['mma']}), {r['ffma_in_loops']} FFMA in loops"
    )


@pytest.mark.parametrize("kernel", sorted(k for k in KERNELS if _EMA.fullmatch(k)))
def test_ema_moves_16_byte_vectors(kernel):
    # per step one vector of each tensor read (two of an fp32 one beside a bf16/fp16 one), one or two written
    r = KERNELS[kernel]
    assert r["ldg_128"] >= 2 and r["stg_128"] >= 1, (
        f"{kernel}: {r['ldg_128']} LDG.128 of {r['ldg']} loads, {r['stg_128']} STG.128 of {r['stg']} stores"
    )


@pytest.mark.parametrize("kernel", _loss_kernels(False))
def test_static_shared_memory_as_planned(kernel):
    # The launchers size the dynamic shared memory a device has room for from this figure (smem_plan).
    which, s, t = _LOSS.fullmatch(kernel).groups()
    C = _ext.get()
    tags = [_ext.DTYPE_TAGS[DTYPES[x]] for x in (s, t)]
    kind = C.LossKernel.forward if which == "fwd" else C.LossKernel.backward
    assert C.cuda_smem_plan(kind, 256, *tags, 232448).static_bytes == KERNELS[kernel]["shared_bytes"]
