"""The CUDA kernels of the built extension meet issue 13's static budgets on sm_90, read from the binary without a
GPU (benchmarks/static.py's ``profile_cuda``: cuobjdump's resource usage and SASS of ``conmim/_C*.so``): no stack
and no spill stores in any kernel; every product of a loss kernel on tensor cores for every (student, teacher)
pair, the logits of an fp32 pair as 3xTF32 (their fp32 FMA loop, taken only at large logits where split logits
failed the large-logit accuracy tests, see csrc/cuda's Mma, stays in the binary too), the backward's gradient
products included (3xTF32 for fp32 with fp32), and few FFMA left in loops (before
the rebuild bwd_q and bwd_k issued only the forward's 4 HMMA of the logits recompute and computed G K and G^T Q on
FFMA; mixed pairs ran everything on FFMA, then fp32 pairs still did); the EMA moving both tensors in 16-byte vectors for every dtype pair (bf16/fp16 moved 4 or 8 bytes at a
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
# FFMA left inside the loops of a loss kernel (norms, softmax, Jacobian, the split of G), none of them a product
# but the exact logits of a pair with an fp32 side, taken at large logits only (FP32_LOGITS_FFMA more: 8
# accumulators a thread, the feature loop unrolled by 4, 32 FFMA, plus its first step, which the compiler peels in
# the forward): an fp32 pair's gradient products ran on FFMA before (432 / 362 FFMA in the loops of bwd_q / bwd_k).
# The forward's 24: without --use_fast_math (which the CPU executor does not model) the key norms' sqrt and
# reciprocal, once per key per tile, are IEEE-rounded with a few FFMA of refinement each (16 with fast math).
MAX_FFMA_IN_LOOPS = {"fwd": 24, "bwd_q": 200, "bwd_k": 200}
FP32_LOGITS_FFMA = 64


def _min_mma(which: str, student: str, teacher: str) -> int:
    """The HMMA a loss kernel must hold, over one 32-wide feature chunk: for the logits 2 k-steps of a bf16/fp16
    pair's m16n16k16 WMMA (2 HMMA each), else 4 k-steps of TF32 m16n16k8 WMMA (4 HMMA each) with one product per
    pair of parts (hi hi, and lo hi for each fp32 side: 3xTF32 for an fp32 pair); the backward
    adds its gradient product, 4 TF32 k-steps of G's hi and lo parts times the features (bwd_q: the teacher's,
    bwd_k: the student's), and of G's hi part times their lo part when they are fp32 (3xTF32)."""
    fp32 = (student == "float", teacher == "float")
    logits = 2 * 2 if student == teacher != "float" else 4 * 4 * (1 + sum(fp32))
    if which == "fwd":
        return logits
    return logits + 4 * 4 * (2 + fp32[1 if which == "bwd_q" else 0])


LOSS_KERNELS = sorted(name for name in KERNELS if _LOSS.fullmatch(name))


def test_every_kernel_family_is_in_the_binary():
    families = {name.split("<")[0] for name in KERNELS}
    assert families >= {"void fwd_kernel", "void bwd_q_kernel", "void bwd_k_kernel", "void ema_kernel"}, (
        families
    )
    assert len(LOSS_KERNELS) == 27 and len([k for k in KERNELS if _EMA.fullmatch(k)]) == 9


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_no_stack_and_no_spills(kernel):
    r = KERNELS[kernel]
    assert (r["stack_bytes"], r["local_bytes"], r["spill_stores"]) == (0, 0, 0), (
        f"{kernel} ({r['registers']} registers): {r['stack_bytes']} B stack, {r['local_bytes']} B local, "
        f"{r['spill_stores']} spill stores"
    )


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_loss_products_on_tensor_cores(kernel):
    r = KERNELS[kernel]
    got = f"{kernel}: {r['hmma']} HMMA / {r['hgmma']} HGMMA ({r['mma']}), {r['ffma_in_loops']} FFMA in loops"
    which, student, teacher = _LOSS.fullmatch(kernel).groups()
    assert r["hmma"] + r["hgmma"] >= _min_mma(which, student, teacher), got
    fp32_logits = FP32_LOGITS_FFMA if "float" in (student, teacher) else 0
    assert r["ffma_in_loops"] <= MAX_FFMA_IN_LOOPS[which] + fp32_logits, got


@pytest.mark.parametrize("kernel", sorted(k for k in KERNELS if _EMA.fullmatch(k)))
def test_ema_moves_16_byte_vectors(kernel):
    # per step one vector of each tensor read (two of an fp32 one beside a bf16/fp16 one), one or two written
    r = KERNELS[kernel]
    assert r["ldg_128"] >= 2 and r["stg_128"] >= 1, (
        f"{kernel}: {r['ldg_128']} LDG.128 of {r['ldg']} loads, {r['stg_128']} STG.128 of {r['stg']} stores"
    )


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_static_shared_memory_as_planned(kernel):
    # The launchers size the dynamic shared memory a device has room for from this figure (smem_plan).
    which, s, t = _LOSS.fullmatch(kernel).groups()
    C = _ext.get()
    tags = [_ext.DTYPE_TAGS[DTYPES[x]] for x in (s, t)]
    kind = C.LossKernel.forward if which == "fwd" else C.LossKernel.backward
    assert C.cuda_smem_plan(kind, 256, *tags, 232448).static_bytes == KERNELS[kernel]["shared_bytes"]
