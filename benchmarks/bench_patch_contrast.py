"""Patch-contrast loss: fused backends vs the official-style reference (full B x N x N logits), the masked-rows
reference, and torch.compile of the masked-rows reference; fwd, bwd and fwd+bwd; time, peak memory, floor."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

import conmim
from benchmarks.harness import (
    Variant,
    fmt_bytes,
    fmt_time,
    kernel_times,
    peak_extra_memory,
    table,
    time_interleaved,
)
from conmim.reference import patch_contrast_loss_official, patch_contrast_loss_reference

# (B, N, d) per suite and device type; dtype fp32 on the CPU, bf16 on a GPU.
CASES = {
    ("quick", "cpu"): [(64, 196, 256), (16, 784, 256)],
    ("full", "cpu"): [(64, 196, 256), (16, 784, 256), (4, 3136, 256), (64, 196, 768), (8, 196, 1024)],
    ("quick", "cuda"): [(256, 196, 256), (64, 784, 256), (16, 3136, 256)],
    ("full", "cuda"): [
        (256, 196, 256),
        (64, 784, 256),
        (16, 3136, 256),
        (256, 3136, 256),
        (256, 196, 768),
        (128, 196, 1024),
    ],
}
MODES = ("fwd", "bwd", "fwd+bwd")


def probe_memory(B: int, N: int, d: int, variant: str) -> int | None:
    """Peak extra memory of one loss call, measured by ``benchmarks.memprobe`` in a fresh process; None if it
    failed (the error goes to stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memprobe", str(B), str(N), str(d), variant],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def make_case(B, N, d, dtype, device, seed=0):
    """Fresh inputs: student (needs grad), teacher (detached), BEiT block masks at ConMIM's ~38% ratio."""
    g = torch.Generator().manual_seed(seed)
    side = math.isqrt(N)
    mask = conmim.block_masks(B, grid=(side, side), num_masking_patches=round(N * 75 / 196), generator=g)
    s = torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype)
    return s, t, mask.to(device)


def fused_backends(device: torch.device) -> list[str]:
    from conmim.ops import patch_contrast_reasons

    probe = torch.empty(1, 4, 16, device=device)
    return [n for n, f in patch_contrast_reasons(probe).items() if not f() and n != "reference"]


def loss_functions(device: torch.device, with_compile: bool = True) -> dict:
    """Variant name -> loss function (student, teacher, mask) -> scalar; the official-style reference first."""
    fns = {
        "official (eager)": patch_contrast_loss_official,
        "masked rows (eager)": patch_contrast_loss_reference,
    }
    if with_compile:
        fns["masked rows (torch.compile)"] = torch.compile(patch_contrast_loss_reference, dynamic=False)
    for name in fused_backends(device):
        fns[f"fused {name}"] = lambda a, b, m, name=name: conmim.patch_contrast_loss(a, b, m, backend=name)
    return fns


def _variants(fns: dict, s, t, mask, mode: str) -> list[Variant]:
    out = []
    for name, f in fns.items():
        if mode == "fwd":
            out.append(Variant(name, lambda _, f=f: f(s.detach(), t, mask)))
        elif mode == "bwd":
            # retain_graph: a GPU sample times many backwards of one forward (harness.Variant.repeatable)
            out.append(
                Variant(name, lambda loss: loss.backward(retain_graph=True), setup=lambda f=f: f(s, t, mask))
            )
        else:
            out.append(Variant(name, lambda _, f=f: f(s, t, mask).backward()))
    return out


def floor_seconds(B, N, d, M, elem, mode, ceil):
    """Lower bound on time: max(bytes / copy bandwidth, FLOPs / matmul rate). Student gradient only."""
    feat = B * N * d * elem
    rows = M * d * elem
    flops = {"fwd": 2 * M * N * d, "bwd": 4 * M * N * d, "fwd+bwd": 6 * M * N * d}[mode]
    nbytes = {"fwd": rows + feat, "bwd": rows + 2 * feat, "fwd+bwd": 2 * (rows + feat) + feat}[mode]
    return max(nbytes / ceil["bandwidth_bytes_per_s"], flops / ceil["matmul_flops_per_s"]), flops, nbytes


def run(suite: str, device: torch.device, ceil: dict, rounds: int, with_compile: bool = True) -> list[dict]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    records = []
    all_fns = loss_functions(device, with_compile)
    for ci, (B, N, d) in enumerate(CASES[(suite, device.type)]):
        s, t, mask = make_case(B, N, d, dtype, device, seed=ci)
        M = int(mask.sum())
        fns = {k: f for k, f in all_fns.items() if "compile" not in k or suite == "full" or ci == 0}
        for mode in MODES:
            timings = time_interleaved(_variants(fns, s, t, mask, mode), device, rounds=rounds, warmup=1)
            floor, flops, nbytes = floor_seconds(B, N, d, M, s.element_size(), mode, ceil)
            for v in _variants(fns, s, t, mask, mode):
                tm = timings[v.name]
                mem = kernels = None
                if mode == "fwd+bwd" and tm.error is None and v.name.startswith("fused"):
                    kernels = kernel_times(v, device)
                if mode == "fwd+bwd" and tm.error is None:
                    if device.type == "cpu":
                        mem = probe_memory(B, N, d, v.name)
                    else:
                        try:
                            mem = peak_extra_memory(v, device)
                        except RuntimeError as exc:
                            tm.error = "out of memory" if "memory" in str(exc) else str(exc)[:200]
                records.append(
                    {
                        "op": "patch_contrast",
                        "B": B,
                        "N": N,
                        "d": d,
                        "masked": M,
                        "dtype": str(dtype),
                        "mode": mode,
                        "variant": v.name,
                        "median_s": tm.median,
                        "spread": tm.spread,
                        "rounds": len(tm.times),
                        "speedup_vs_official": (
                            sorted(tm.ratios)[len(tm.ratios) // 2] if tm.ratios else None
                        ),
                        "peak_extra_bytes": mem,
                        "kernel_s": kernels,
                        "floor_s": floor,
                        "flops": flops,
                        "bytes": nbytes,
                        "floor_fraction": (floor / tm.median) if tm.median else None,
                        "error": tm.error,
                    }
                )
            s.grad = None
    return records


def render(records: list[dict]) -> str:
    rows = []
    for r in records:
        rows.append(
            [
                f"{r['B']}x{r['N']}x{r['d']}",
                r["mode"],
                r["variant"],
                r["error"] or fmt_time(r["median_s"]),
                f"±{100 * r['spread']:.0f}%" if r["spread"] is not None else "-",
                f"{r['speedup_vs_official']:.2f}x" if r["speedup_vs_official"] else "-",
                fmt_bytes(r["peak_extra_bytes"]),
                f"{100 * r['floor_fraction']:.1f}%" if r["floor_fraction"] else "-",
            ]
        )
    return table(
        rows,
        ["B x N x d", "mode", "variant", "median", "spread", "vs official", "peak extra mem", "of floor"],
    )
