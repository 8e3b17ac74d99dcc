"""Shared benchmark harness.

Timing: variants run interleaved (A B C A B C ...) so that drift and other load hit every variant alike, with
per-round ratios against the baseline. On a GPU each round's time of a variant is ``triton.testing.do_bench``'s
median over many back-to-back calls, each preceded by an L2 flush (one call between two events would measure the
host's launch overhead, not ~50 us of kernels behind a custom-op dispatch); on the CPU, one ``perf_counter`` call.
Per-kernel device times of one call come from ``torch.profiler`` (``kernel_times``). Memory: ``torch.cuda.max_memory_allocated`` growth on a GPU; on the CPU the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) over the call. Ceilings (copy bandwidth, matmul
rate) are measured in the same run so every result carries its fraction of the hardware floor.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return "gpu-" + "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower())
    return f"cpu-{os.cpu_count()}core"


def commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    from conmim import __version__, _ext

    out["conmim"] = __version__
    out["cuda_archs"] = _ext.cuda_archs()
    return out


# ------------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    """One thing to time. ``setup()`` (untimed) returns the argument of ``run(arg)`` (timed); e.g. a forward
    pass in setup and the backward in run."""

    name: str
    run: Callable
    setup: Callable = lambda: None
    # run(arg) may be called many times on one setup() (e.g. a backward with retain_graph): on a GPU do_bench
    # then times run alone; otherwise each GPU sample is one setup() and one run() between two events
    repeatable: bool = True


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # baseline time / this time, round by round
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def spread(self) -> float | None:
        """Half the interquartile range, relative to the median."""
        if len(self.times) < 4:
            return None
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / 2 / statistics.median(self.times)


# do_bench's budget per sample (ms): enough calls of a ~50 us op for a stable median, few enough for many rounds
GPU_WARMUP_MS, GPU_REP_MS = 5, 25


def _one(v: Variant, device: torch.device) -> float:
    arg = v.setup()
    sync(device)
    if device.type == "cuda" and v.repeatable:
        from triton.testing import do_bench

        ms = do_bench(lambda: v.run(arg), warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, return_mode="median")
        return ms / 1e3
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        v.run(arg)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    v.run(arg)
    return time.perf_counter() - t0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def time_interleaved(
    variants: list[Variant], device: torch.device, rounds: int, warmup: int = 1, budget_s: float = 20.0
) -> dict[str, Timing]:
    """Run each variant ``warmup`` times, then ``rounds`` rounds of A B C ...; the first variant is the baseline.
    A variant that fails (e.g. out of memory) is recorded with its error and dropped. Stops early once
    ``budget_s`` is spent (after at least 3 rounds)."""
    out = {v.name: Timing() for v in variants}
    alive = []
    for v in variants:
        try:
            for _ in range(warmup):
                _one(v, device)
            alive.append(v)
        except Exception as exc:
            if not is_oom(exc) and not isinstance(exc, RuntimeError):
                raise
            out[v.name].error = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:200]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    t_start = time.perf_counter()
    base = variants[0].name
    for r in range(rounds):
        row = {}
        for v in alive:
            row[v.name] = _one(v, device)
            out[v.name].times.append(row[v.name])
        if base in row:
            for name, t in row.items():
                out[name].ratios.append(row[base] / t)
        if r >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return out


def kernel_times(v: Variant, device: torch.device, calls: int = 5, top: int = 12) -> dict[str, float]:
    """Device time per call of each kernel that ``v`` launches (CUDA kernels on a GPU; on the CPU the ops' own
    CPU time), from ``torch.profiler`` over ``calls`` calls after one warm-up: {name: seconds per call}, the
    ``top`` largest, largest first. Names are shortened to 120 characters."""
    from torch.profiler import ProfilerActivity, profile

    arg = v.setup()
    v.run(arg)
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            v.run(arg if v.repeatable else v.setup())
        sync(device)
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if us > 0:
            totals[evt.key[:120]] = totals.get(evt.key[:120], 0.0) + us / 1e6 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


# ------------------------------------------------------------------------------------------------------ memory
def _vm(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(v: Variant, device: torch.device) -> int | None:
    """Bytes the call needs beyond what is allocated before it (setup included in the baseline)."""
    gc.collect()
    arg = v.setup()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        v.run(arg)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _vm("VmRSS")
    v.run(arg)
    return max(0, _vm("VmHWM") - base)


# ---------------------------------------------------------------------------------------------------- ceilings
def _bandwidth(device: torch.device, n: int) -> tuple[float, float]:
    """(copy, in-place add) rates in bytes moved per second: copy counts read + write (8 B/element), ``a += b``
    reads two and writes one (12 B/element, the EMA's own traffic pattern, with no write-allocate reads)."""
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    variants = [Variant("copy", lambda _: dst.copy_(src)), Variant("add", lambda _: dst.add_(src))]
    t = time_interleaved(variants, device, rounds=10, warmup=2, budget_s=5)
    return 8 * n / t["copy"].median, 12 * n / t["add"].median


def _matmul_rate(device: torch.device) -> tuple[float, str]:
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = time_interleaved([Variant("mm", lambda _: a @ b)], device, rounds=8, warmup=2, budget_s=5)[
        "mm"
    ].median
    return 2 * size**3 / t, str(dtype)


def ceilings(device: torch.device) -> dict:
    """Measured in this run: copy bandwidth (bytes read + written per second), the best streaming bandwidth
    (max of copy and in-place add, used for floors), and the matmul rate (fp32 on CPU, bf16 on GPU)."""
    copy, add = _bandwidth(device, (1 << 28) if device.type == "cuda" else (1 << 25))
    rate, dtype = _matmul_rate(device)
    return {
        "copy_bytes_per_s": copy,
        "add_bytes_per_s": add,
        "bandwidth_bytes_per_s": max(copy, add),
        "matmul_flops_per_s": rate,
        "matmul_dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------------- results
def save(results: dict, device: torch.device, suite: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = RESULTS / f"{device_slug(device)}-{date}.json"
    payload = {
        "device": device_name(device),
        "device_type": device.type,
        "date": date,
        "suite": suite,
        "commit": commit(),
        "versions": versions(),
        **results,
    }
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)
