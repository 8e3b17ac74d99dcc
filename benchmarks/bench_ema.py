"""EMA update of the momentum teacher: per-parameter loop vs torch._foreach_lerp_ vs the fused backends, on
parameter lists shaped like ViT-S/16 and ViT-B/16 with the ConMIM projection head (fp32)."""

from __future__ import annotations

import torch

import conmim
from benchmarks.harness import Variant, fmt_time, kernel_times, table, time_interleaved
from conmim.reference import ema_update_loop_

MODELS = {"quick": ["vit_small+head", "vit_base+head"], "full": ["vit_small+head", "vit_base+head"]}
DIMS = {"vit_small+head": 384, "vit_base+head": 768}


def vit_param_shapes(
    dim: int, depth: int = 12, patch: int = 16, tokens: int = 197, hidden: int = 4096, out: int = 256
) -> list[tuple[int, ...]]:
    """Parameter shapes of a timm ViT (patch embed, tokens, blocks, final norm) plus ConMIM's projection head
    (Linear-BN-ReLU x2, Linear, BN without affine)."""
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [
            (dim,),
            (dim,),
            (3 * dim, dim),
            (3 * dim,),
            (dim, dim),
            (dim,),
            (dim,),
            (dim,),
            (4 * dim, dim),
            (4 * dim,),
            (dim, 4 * dim),
            (dim,),
        ]
    shapes += [(dim,), (dim,)]
    shapes += [(hidden, dim), (hidden,), (hidden,), (hidden, hidden), (hidden,), (hidden,), (out, hidden)]
    return shapes


def fused_backends(device: torch.device) -> list[str]:
    from conmim.ops import ema_reasons

    probe = [torch.empty(8, device=device)]
    return [n for n, f in ema_reasons(probe, probe).items() if not f() and n != "reference"]


def _variants(teacher, student, m, device) -> list[Variant]:
    out = [
        Variant("per-parameter loop", lambda _: ema_update_loop_(teacher, student, m)),
        Variant("torch._foreach_lerp_", lambda _: torch._foreach_lerp_(teacher, student, 1 - m)),
    ]
    for name in fused_backends(device):
        out.append(
            Variant(f"fused {name}", lambda _, n=name: conmim.ema_update_(teacher, student, m, backend=n))
        )
    return out


def run(suite: str, device: torch.device, ceil: dict, rounds: int) -> list[dict]:
    records = []
    for model in MODELS[suite]:
        shapes = vit_param_shapes(DIMS[model])
        g = torch.Generator().manual_seed(0)
        teacher = [torch.randn(s, generator=g).to(device) for s in shapes]
        student = [torch.randn(s, generator=g).to(device) for s in shapes]
        n_params = sum(t.numel() for t in teacher)
        variants = _variants(teacher, student, 0.996, device)
        timings = time_interleaved(variants, device, rounds=rounds, warmup=2)
        for v in variants:
            tm = timings[v.name]
            gbps = 12 * n_params / tm.median if tm.median else None
            records.append(
                {
                    "op": "ema",
                    "model": model,
                    "params": n_params,
                    "tensors": len(shapes),
                    "variant": v.name,
                    "median_s": tm.median,
                    "spread": tm.spread,
                    "rounds": len(tm.times),
                    "speedup_vs_loop": sorted(tm.ratios)[len(tm.ratios) // 2] if tm.ratios else None,
                    "bytes_per_s_at_12B": gbps,
                    "fraction_of_copy": gbps / ceil["copy_bytes_per_s"] if gbps else None,
                    "fraction_of_bandwidth": gbps / ceil["bandwidth_bytes_per_s"] if gbps else None,
                    "error": tm.error,
                    "kernel_s": (
                        kernel_times(v, device) if tm.error is None and v.name.startswith("fused") else None
                    ),
                }
            )
    return records


def render(records: list[dict]) -> str:
    rows = [
        [
            r["model"],
            f"{r['params'] / 1e6:.1f} M / {r['tensors']}",
            r["variant"],
            r["error"] or fmt_time(r["median_s"]),
            f"±{100 * r['spread']:.0f}%" if r["spread"] is not None else "-",
            f"{r['speedup_vs_loop']:.2f}x" if r["speedup_vs_loop"] else "-",
            f"{r['bytes_per_s_at_12B'] / 1e9:.1f} GB/s" if r["bytes_per_s_at_12B"] else "-",
            f"{100 * r['fraction_of_copy']:.0f}%" if r["fraction_of_copy"] else "-",
            f"{100 * r['fraction_of_bandwidth']:.0f}%" if r["fraction_of_bandwidth"] else "-",
        ]
        for r in records
    ]
    return table(
        rows,
        [
            "params",
            "size / tensors",
            "variant",
            "median",
            "spread",
            "vs loop",
            "at 12 B/param",
            "of copy bw",
            "of best streaming bw",
        ],
    )
