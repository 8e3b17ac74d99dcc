"""pytest-benchmark entry points: ``pytest benchmarks/ --benchmark-only`` (grouped by op and shape).

The same variants as ``python -m benchmarks``, on the first case of each op's quick suite for this device.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_ema import _variants as ema_variants
from benchmarks.bench_ema import vit_param_shapes
from benchmarks.bench_patch_contrast import CASES, loss_functions, make_case
from benchmarks.harness import sync

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
B, N, D = CASES[("quick", DEVICE.type)][0]
LOSS_FNS = loss_functions(DEVICE)


@pytest.fixture(scope="module")
def loss_case():
    return make_case(B, N, D, DTYPE, DEVICE)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", list(LOSS_FNS))
def test_patch_contrast(benchmark, loss_case, variant, mode):
    s, t, mask = loss_case
    fn = LOSS_FNS[variant]
    benchmark.group = f"patch_contrast {mode} {B}x{N}x{D} {str(DTYPE).replace('torch.', '')} {DEVICE.type}"

    def fwd():
        out = fn(s.detach(), t, mask)
        sync(DEVICE)
        return out

    def fwd_bwd():
        fn(s, t, mask).backward()
        sync(DEVICE)

    def setup_bwd():
        return (fn(s, t, mask),), {}

    def bwd(loss):
        loss.backward()
        sync(DEVICE)

    if mode == "fwd":
        benchmark.pedantic(fwd, rounds=7, warmup_rounds=1)
    elif mode == "bwd":
        benchmark.pedantic(bwd, setup=setup_bwd, rounds=7, warmup_rounds=1)
    else:
        benchmark.pedantic(fwd_bwd, rounds=7, warmup_rounds=1)
    s.grad = None


@pytest.fixture(scope="module")
def ema_lists():
    g = torch.Generator().manual_seed(0)
    shapes = vit_param_shapes(384)
    teacher = [torch.randn(sh, generator=g).to(DEVICE) for sh in shapes]
    student = [torch.randn(sh, generator=g).to(DEVICE) for sh in shapes]
    return teacher, student


def _time_variant(benchmark, group, v, rounds):
    """pytest-benchmark timing of one harness Variant whose run takes no setup argument."""
    benchmark.group = group
    benchmark.name = v.name

    def run():
        v.run(None)
        sync(DEVICE)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize(
    "index", range(4)
)  # loop, foreach, then fused cpu, or fused triton and cuda on a GPU
def test_ema(benchmark, ema_lists, index):
    teacher, student = ema_lists
    variants = ema_variants(teacher, student, 0.996, DEVICE)
    if index >= len(variants):
        pytest.skip(f"only {len(variants)} EMA variants run on {DEVICE.type} (two fused ones need a GPU)")
    _time_variant(benchmark, f"ema vit_small+head fp32 {DEVICE.type}", variants[index], rounds=7)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_data_pipeline(benchmark, loader):
    from benchmarks.bench_data import _folder
    from conmim.data import ViewConfig, build_loader, dali_status

    if loader == "dali" and dali_status() is not None:
        pytest.skip(dali_status())
    data = build_loader(
        _folder(64),
        32,
        ViewConfig(),
        loader=loader,
        device=DEVICE,
        num_workers=max(1, torch.get_num_threads()),
        verbose=False,
    )
    benchmark.group = f"data two-view 224px {DEVICE.type} (one epoch of 64 images)"

    def epoch():
        for _ in data:
            pass
        sync(DEVICE)

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("variant", [0, 1])
def test_train_step(benchmark, variant):
    from benchmarks.bench_train_step import step_variants

    variants, _ = step_variants(DEVICE)
    _time_variant(benchmark, f"train step {DEVICE.type}", variants[variant], rounds=3)
