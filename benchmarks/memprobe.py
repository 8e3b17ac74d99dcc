"""Peak extra CPU memory of one loss call, measured in a fresh process.

``python -m benchmarks.memprobe B N d VARIANT`` builds the case's inputs, records the process's peak resident set
(VmHWM), runs forward + backward once, and prints the growth of VmHWM in bytes. A fresh process has never touched
the pages the call needs, so they all count (in a long-lived process freed memory is reused and hides the peak).
``bench_patch_contrast.probe_memory`` starts it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv) -> int:
    from benchmarks.bench_patch_contrast import loss_functions, make_case

    B, N, d, variant = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    device = torch.device("cpu")
    s, t, mask = make_case(B, N, d, torch.float32, device)
    fn = loss_functions(device)[variant]
    if "compile" in variant:  # compile on a small case first so that compilation's own memory is not counted
        small = make_case(2, N, d, torch.float32, device, seed=1)
        fn(*small).backward()
    base = _hwm()
    fn(s, t, mask).backward()
    print(_hwm() - base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
