"""Which GPU backend ``auto`` tries first for the loss, from the committed GPU benchmark results.

``python -m benchmarks report`` writes ``conmim/gpu_preference.json`` from every GPU results file that timed both
fused backends: for each measured shape (N, d) the faster one. A call picks the rule of the nearest measured
shape (log-distance in N and d); with no such file, Triton goes first.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).resolve().parent / "gpu_preference.json"
DEFAULT = ("triton", "cuda")


@lru_cache(maxsize=1)
def _rules() -> tuple[list[dict], str]:
    if not PATH.exists():
        return [], "no committed GPU comparison of the Triton and CUDA kernels yet: Triton first"
    data = json.loads(PATH.read_text())
    return data.get("patch_contrast", []), f"from {data.get('source', PATH.name)}"


def gpu_order(N: int, d: int) -> tuple[tuple[str, str], str]:
    """((first, second) GPU backends, why) for a loss of N patches and d features."""
    rules, why = _rules()
    if not rules:
        return DEFAULT, why
    best = min(rules, key=lambda r: abs(math.log(r["N"] / N)) + abs(math.log(r["d"] / d)))
    first = best["faster"]
    second = "cuda" if first == "triton" else "triton"
    return (first, second), f"{first} was faster at N={best['N']}, d={best['d']} ({why})"
