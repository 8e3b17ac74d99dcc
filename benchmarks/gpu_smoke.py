"""The GPU check's smoke stages (benchmarks/gpu_check.sh): the ConMIM shapes on one backend against a float64
reference, each case's errors and time written to the JSON file as soon as it is measured.

    python -m benchmarks.gpu_smoke loss --backend triton --out smoke_triton.json
    python -m benchmarks.gpu_smoke sanitize --out sanitize_cases.json   # one small case per CUDA kernel

Loss cases: bf16 at B = 128 and 256 (N = 196, d = 256, 40% of the patches masked), one fp32 case with a
``positive_index``, and one fp16 case whose gradient tiles pass fp16's range (teacher rows of norm ~0.016,
cotangents ~1e3, as under a loss scale: the Triton backward's scaled high/low split); each forward and backward against the float64 reference computed from the same rounded inputs,
with the tolerance of the tests (tests/conftest.py: TOL) and the fused forward + backward's GPU time
(harness: do_bench, L2 flushed) and per-kernel times (torch.profiler). EMA: the ViT-B + head parameter list (fp32).
``--dry-run``: the same code on the CPU with tiny shapes (the "cuda" backend replaced by "cpu"), for CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import conmim
from benchmarks import bench_ema
from benchmarks.harness import Variant, kernel_times, time_interleaved
from conmim.reference import ema_update_reference_, patch_contrast_loss_reference

# (loss rtol, gradient rtol against the largest |gradient|): the tests' table for these dtypes
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (2e-4, 1.6e-2), torch.float16: (2e-4, 2e-3)}
# the fp16 case: teacher rows scaled by this, cotangents by GRAD_SCALE, so that entries of the gradient tile
# (cotangent / tau x probability / |key|) pass 65504 while d(student) stays inside fp16
TEACHER_SCALE, GRAD_SCALE = 1e-3, 1e3


def loss_cases(dry: bool) -> list[dict]:
    if dry:
        return [
            dict(name="bf16 B=2", B=2, N=12, d=16, dtype=torch.bfloat16, pos=False),
            dict(name="fp32 B=2 positive_index", B=2, N=12, d=16, dtype=torch.float32, pos=True),
            dict(name="fp16 B=2 past fp16 range", B=2, N=12, d=16, dtype=torch.float16, pos=False, big=True),
        ]
    return [
        dict(name="bf16 B=128", B=128, N=196, d=256, dtype=torch.bfloat16, pos=False),
        dict(name="bf16 B=256", B=256, N=196, d=256, dtype=torch.bfloat16, pos=False),
        dict(name="fp32 B=128 positive_index", B=128, N=196, d=256, dtype=torch.float32, pos=True),
        dict(
            name="fp16 B=128 past fp16 range", B=128, N=196, d=256, dtype=torch.float16, pos=False, big=True
        ),
    ]


def _inputs(case: dict, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, N, d = case["B"], case["N"], case["d"]
    s = torch.randn(B, N, d, generator=g).to(device, case["dtype"])
    t = (torch.randn(B, N, d, generator=g) * (TEACHER_SCALE if case.get("big") else 1.0)).to(
        device, case["dtype"]
    )
    mask = (torch.rand(B, N, generator=g) < 0.4).to(device)
    pos = torch.randint(0, N, (B, N), generator=g).to(device) if case["pos"] else None
    return s, t, mask, pos


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want).abs().max().item() / scale


def loss_case(case: dict, backend: str, device: torch.device, seed: int) -> dict:
    s, t, mask, pos = _inputs(case, device, seed)
    grad_out = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    if case.get("big"):
        grad_out = grad_out * GRAD_SCALE

    def fused(a, b):
        return conmim.patch_contrast_loss(a, b, mask, 0.1, "none", True, pos, backend)

    def exact(a, b):
        return patch_contrast_loss_reference(a, b, mask, 0.1, "none", True, pos)

    # the fp16 case's teacher gradient would pass fp16's range itself: the teacher takes none there, as in
    # ConMIM (an EMA teacher)
    need_teacher = not case.get("big")
    out = {}
    for name, fn, dtype in (("fused", fused, None), ("ref64", exact, torch.float64)):
        a = (s if dtype is None else s.to(dtype)).detach().requires_grad_(True)
        b = (t if dtype is None else t.to(dtype)).detach().requires_grad_(need_teacher)
        loss = fn(a, b)
        grads = torch.autograd.grad(loss, [a, b] if need_teacher else [a], grad_out.to(loss.dtype))
        out[name] = (loss.detach(), *grads)
    loss_tol, grad_tol = TOL[case["dtype"]]
    errors = {
        "loss": _rel(out["fused"][0], out["ref64"][0]),
        "d_student": _rel(out["fused"][1], out["ref64"][1]),
    }
    if need_teacher:
        errors["d_teacher"] = _rel(out["fused"][2], out["ref64"][2])
    ok = errors["loss"] <= loss_tol and max(v for k, v in errors.items() if k != "loss") <= grad_tol
    sg = s.detach().requires_grad_(True)
    v = Variant(
        "fused fwd+bwd",
        lambda _: conmim.patch_contrast_loss(sg, t, mask, 0.1, "mean", True, pos, backend).backward(),
    )
    timing = time_interleaved([v], device, rounds=3, warmup=1, budget_s=10)[v.name]
    return {
        "case": case["name"],
        "backend": backend,
        "B": case["B"],
        "N": case["N"],
        "d": case["d"],
        "dtype": str(case["dtype"]),
        "masked": int(mask.sum()),
        "rel_errors": errors,
        "tolerance": {"loss": loss_tol, "grad": grad_tol},
        "ok": ok,
        "median_s": timing.median,
        "kernel_s": kernel_times(v, device, calls=3),
        "error": timing.error,
    }


def ema_case(backend: str, device: torch.device, dry: bool) -> dict:
    shapes = [(64,), (33, 5)] if dry else bench_ema.vit_param_shapes(bench_ema.DIMS["vit_base+head"])
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(s, generator=g).to(device) for s in shapes]
    student = [torch.randn(s, generator=g).to(device) for s in shapes]
    want = [x.clone() for x in teacher]
    conmim.ema_update_(teacher, student, 0.996, backend=backend)
    ema_update_reference_(want, student, 0.996)
    err = max((a - b).abs().max().item() for a, b in zip(teacher, want))
    v = Variant("fused ema", lambda _: conmim.ema_update_(teacher, student, 0.996, backend=backend))
    timing = time_interleaved([v], device, rounds=5, warmup=1, budget_s=10)[v.name]
    n = sum(x.numel() for x in teacher)
    return {
        "case": "ema vit_base+head fp32" if not dry else "ema tiny fp32",
        "backend": backend,
        "params": n,
        "tensors": len(shapes),
        "max_abs_error": err,
        "ok": err <= 1e-6,
        "median_s": timing.median,
        "bytes_per_s_at_12B": 12 * n / timing.median if timing.median else None,
        "kernel_s": kernel_times(v, device, calls=3),
        "error": timing.error,
    }


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def run_loss(backend: str, device: torch.device, dry: bool, out: Path) -> bool:
    payload = {"backend": backend, "device": str(device), "dry_run": dry, "cases": []}
    all_ok = True
    for i, case in enumerate(loss_cases(dry)):
        t0 = time.perf_counter()
        try:
            rec = loss_case(case, backend, device, seed=i)
        except Exception as exc:  # one case failing must not hide the others' numbers
            rec = {
                "case": case["name"],
                "backend": backend,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
            }
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        all_ok &= bool(rec["ok"])
        payload["cases"].append(rec)
        _write(out, payload)
        print(json.dumps(rec), flush=True)
    try:
        rec = ema_case(backend, device, dry)
    except Exception as exc:
        rec = {"case": "ema", "backend": backend, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    all_ok &= bool(rec["ok"])
    payload["cases"].append(rec)
    _write(out, payload)
    print(json.dumps(rec), flush=True)
    return all_ok


def run_sanitize_cases(backend: str, device: torch.device) -> None:
    """One small case per CUDA kernel (the forward, both backward kernels, the EMA), for compute-sanitizer:
    bf16 with a positive_index and a ragged mask, N = 37 (a tile and a tail), d = 40 (a chunk and a tail)."""
    case = dict(name="sanitize", B=2, N=37, d=40, dtype=torch.bfloat16, pos=True)
    s, t, mask, pos = _inputs(case, device, 0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    conmim.patch_contrast_loss(s, t, mask, 0.1, "sum", True, pos, backend).backward()
    teacher = [torch.randn(1000, device=device), torch.randn(37, 5, device=device)]
    student = [torch.randn(1000, device=device), torch.randn(37, 5, device=device)]
    conmim.ema_update_(teacher, student, 0.99, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize cases ran on {backend}: loss forward, backward (student and teacher), EMA", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__)
    p.add_argument("what", choices=("loss", "sanitize"))
    p.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    p.add_argument("--out", default="", help="JSON file, rewritten after every case (loss)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes; 'cuda' runs as 'cpu'")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no GPU is visible to torch (use --dry-run on the CPU)")
    backend = "cpu" if args.dry_run and args.backend == "cuda" else args.backend
    if args.what == "sanitize":
        run_sanitize_cases(backend, device)
        return 0
    out = Path(args.out or f"smoke_{args.backend}.json")
    return 0 if run_loss(backend, device, args.dry_run, out) else 1


if __name__ == "__main__":
    sys.exit(main())
