"""``python -m benchmarks mutate``: plants one bug at a time in the GPU kernels (csrc/cuda, kernels/) and runs the
CPU tests that reach them (the CUDA kernels through the CPU executor, the Triton kernels under its interpreter);
a mutant is killed when those tests fail. Prints each outcome and the kill rate, and writes them as JSON (--out).

Every mutant is planted in a temporary copy of the sources (csrc/, kernels/, conmim/, tests/ and the executor's
object cache), never in the working tree, and the copy is restored after each one. A mutant's tests stop at the
first failure (-x), so a killed mutant costs little; a survivor runs its whole selection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PCU, EMACU = "csrc/cuda/patch_contrast.cu", "csrc/cuda/ema.cu"
PTR, EMATR = "kernels/patch_contrast.py", "kernels/ema.py"

# The tests that reach each kernel family on the CPU, as pytest arguments ("-k cuda" keeps test_layouts' and
# test_positive_bounds' CUDA-executor cases and every case of test_cuda_on_cpu.py).
CUDA_LOSS = [
    "tests/test_layouts.py",
    "tests/test_positive_bounds.py",
    "tests/test_cuda_on_cpu.py::test_loss_every_dtype_pair_and_mask",
    "tests/test_cuda_on_cpu.py::test_loss_positive_index_strides_unnormalized",
    "-k",
    "cuda and not ema",
]
CUDA_EMA = [
    "tests/test_layouts.py::test_sentinels_after_every_ema_teacher",
    "tests/test_cuda_on_cpu.py::test_ema_odd_sizes_dtype_pairs_and_alignments",
    "-k",
    "cuda",
]
TRITON_LOSS = [
    "tests/test_triton_16bit.py",  # first: seconds, and the only tests that run the 16-bit branches
    "tests/test_layouts.py",
    "tests/test_positive_bounds.py",
    "tests/test_patch_contrast.py",
    "-k",
    "triton and not ema",
]
TRITON_EMA = ["tests/test_layouts.py::test_sentinels_after_every_ema_teacher", "-k", "triton"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple
    occurrence: int = 0  # which occurrence of ``old`` (0-based) when it occurs more than once


def _m(name, path, old, new, tests, occurrence=0) -> Mutant:
    return Mutant(name, path, old, new, tuple(tests), occurrence)


MUTANTS = [
    # ---- csrc/cuda/patch_contrast.cu
    _m("cuda-grad-row-stride", PCU, "grad[b * g_sb + sh.q_row[r] * g_sn]", "grad[b * g_sb + sh.q_row[r]]",
       CUDA_LOSS),
    _m("cuda-bwdq-teacher-feature-stride", PCU,
       "c_pos * to_f(key[static_cast<int64_t>(d) * a.t_sd])", "c_pos * to_f(key[d])", CUDA_LOSS),
    _m("cuda-positive-stride", PCU, "p = a.pos[b * a.p_sb + row * a.p_sn];", "p = a.pos[b * a.p_sb + row];",
       CUDA_LOSS),
    _m("cuda-positive-bound-off-by-one", PCU, "if (p < 0 || p >= a.N) p = kNoPositive;",
       "if (p < 0 || p > a.N) p = kNoPositive;", CUDA_LOSS),
    _m("cuda-fwd-positive-ignored", PCU, "warp_sum(col == sh.pos[r] ? x : 0.f)",
       "warp_sum(col == sh.q_row[r] ? x : 0.f)", CUDA_LOSS),
    _m("cuda-bwdq-positive-kept-in-rest", PCU, "const float other = k_rows[j] == sh.pos[r] ? 0.f : e;",
       "const float other = e;", CUDA_LOSS),
    _m("cuda-bwdk-positive-sign", PCU, "v = -c * rest[r];", "v = c * rest[r];", CUDA_LOSS),
    _m("cuda-unnormalized-positive-scale", PCU, "const float inv = a.normalize ? 1.f / fmaxf(sqrtf(sq), kNormEps) : 1.f;",
       "const float inv = a.normalize ? 1.f / fmaxf(sqrtf(sq), kNormEps) : 0.5f;", CUDA_LOSS),
    _m("cuda-store-wrong-row", PCU, "T* dst = out + (b * N + rows[r]) * static_cast<int64_t>(D);",
       "T* dst = out + (b * N + r) * static_cast<int64_t>(D);", CUDA_LOSS),
    # ---- csrc/cuda/ema.cu
    _m("cuda-ema-one-past-the-end", EMACU, "const int64_t n = min(kChunk, p.numel[lo] - start);",
       "const int64_t n = min(kChunk, p.numel[lo] - start + 1);", CUDA_EMA),
    _m("cuda-ema-lerp-weight", EMACU, "s - (s - t) * (1.f - w);", "s - (s - t) * w;", CUDA_EMA),
    # ---- kernels/patch_contrast.py
    _m("triton-positive-stride", PTR, "tl.load(pos_ptr + b * p_sb + row_idx * p_sn, mask=valid, other=0)",
       "tl.load(pos_ptr + b * N + row_idx, mask=valid, other=0)", TRITON_LOSS),
    _m("triton-positive-bound-off-by-one", PTR, "bad = valid & ((pos < 0) | (pos >= N))",
       "bad = valid & ((pos < 0) | (pos > N))", TRITON_LOSS),
    _m("triton-bwdq-grad-row-stride", PTR, "g_ptr + b * g_sb + row_idx * g_sn", "g_ptr + b * g_sb + row_idx",
       TRITON_LOSS, 0),
    _m("triton-bwdw-positive-sign", PTR, "w_pos = -g * rest", "w_pos = g * rest", TRITON_LOSS),
    _m("triton-fwd-tail-columns-counted", PTR, 'logits = tl.where(col_ok[None, :], logits, float("-inf"))',
       "logits = tl.where(col_ok[None, :], logits, 0.0)", TRITON_LOSS),
    _m("triton-bwdk-projection", PTR, "proj += tl.sum(w * cos, axis=0)", "proj += tl.sum(w, axis=0)",
       TRITON_LOSS),
    _m("triton-squares-in-input-dtype", PTR, "xf = x.to(tl.float32)", "xf = x", TRITON_LOSS),
    _m("triton-bf16-split-without-residual", PTR, "return tl.dot(lo, x, acc=tl.dot(hi, x, acc=acc))",
       "return tl.dot(hi, x, acc=acc)", TRITON_LOSS),
    _m("triton-fp16-split-without-residual", PTR, "tl.dot(lo, x, acc=tl.dot(hi, x, acc=acc * down))",
       "tl.dot(hi, x, acc=acc * down)", TRITON_LOSS),
    _m("triton-fp16-split-unscaled", PTR, "e = tl.where(big > 16384.0,", "e = tl.where(big > 1e38,", TRITON_LOSS),
    # ---- kernels/ema.py
    _m("triton-ema-one-past-the-end", EMATR, "_lerp(t_base + offs, s_base + offs, w, offs < n, T_DTYPE, True)",
       "_lerp(t_base + offs, s_base + offs, w, offs <= n, T_DTYPE, True)", TRITON_EMA),
    _m("triton-ema-momentum-not-inverted", EMATR, "w = 1.0 - _momentum(momentum, momentum_ptr, HAS_MPTR)",
       "w = _momentum(momentum, momentum_ptr, HAS_MPTR)", TRITON_EMA),
]  # fmt: skip


def plant(text: str, m: Mutant) -> str:
    """``text`` with the mutant's occurrence of ``old`` replaced; ValueError if the source no longer has it."""
    at = -1
    for _ in range(m.occurrence + 1):
        at = text.find(m.old, at + 1)
        if at < 0:
            raise ValueError(
                f"mutant {m.name}: {m.path} no longer contains {m.old!r} (occurrence {m.occurrence})"
            )
    return text[:at] + m.new + text[at + len(m.old) :]


def make_copy(dest: Path) -> Path:
    """A copy of what the mutants' tests import and build, with the executor's object cache (objects are keyed by
    their source's content, so only a mutated file recompiles)."""
    for d in ("csrc", "kernels", "conmim", "tests"):
        shutil.copytree(ROOT / d, dest / d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml",):
        shutil.copy2(ROOT / f, dest / f)
    cache = ROOT / "build" / "cuda_on_cpu"
    if cache.is_dir():
        shutil.copytree(cache, dest / "build" / "cuda_on_cpu")
    # conmim.kernels is the kernels/ folder (setup.py's package_dir); a link resolves it without an install
    link = dest / "conmim" / "kernels"
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(Path("..") / "kernels")
    return dest


@dataclass
class Outcome:
    name: str
    path: str
    killed: bool
    how: str
    seconds: float


def run_one(copy: Path, m: Mutant, timeout: float) -> Outcome:
    target = copy / m.path
    original = target.read_text()
    target.write_text(plant(original, m))
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(copy), TRITON_INTERPRET="1", PYTHONFAULTHANDLER="0")
    # -m "": the executor's tests are in the slow layer, and a mutant's tests are chosen by file and -k already
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "", *m.tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        rc = proc.returncode
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        if rc == 0:
            how = "survived: " + tail[0]
        elif rc < 0 or rc > 5:
            how = f"crashed (rc {rc})"
        elif rc == 1:
            how = "a test failed: " + tail[0]
        else:
            how = f"pytest rc {rc}: " + tail[0]
        killed = rc != 0 and rc != 5  # 5: no test collected, which proves nothing
    except subprocess.TimeoutExpired:
        killed, how = True, f"timed out after {timeout:.0f} s"
    finally:
        target.write_text(original)
    return Outcome(m.name, m.path, killed, how, round(time.perf_counter() - t0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks mutate", description=__doc__)
    p.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's tests")
    p.add_argument("--out", default="", help="write the outcomes as JSON here")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.only and len(chosen) != len(set(args.only.split(","))):
        known = sorted(m.name for m in MUTANTS)
        p.error(f"--only: unknown mutant name(s); known: {', '.join(known)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.path}")
        return 0
    for m in chosen:  # every mutant still matches its source, before anything runs
        plant((ROOT / m.path).read_text(), m)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="conmim-mutate-") as tmp:
        copy = make_copy(Path(tmp))
        for m in chosen:
            o = run_one(copy, m, args.timeout)
            outcomes.append(o)
            print(
                f"{'KILLED  ' if o.killed else 'SURVIVED'} {o.name:40s} {o.seconds:7.1f} s  {o.how}",
                flush=True,
            )
    killed = sum(o.killed for o in outcomes)
    print(f"kill rate: {killed}/{len(outcomes)}", flush=True)
    if args.out:
        record = {"killed": killed, "total": len(outcomes), "mutants": [asdict(o) for o in outcomes]}
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
