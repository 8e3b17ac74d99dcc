"""``python -m conmim.info``: versions, the compiled extension, the GPU, and which backend can run each op here."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

from conmim import _ext
from conmim.ops import ema_reasons, patch_contrast_reasons


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return str(getattr(mod, "__version__", "unknown version"))


def _probe_inputs(device: torch.device):
    s = torch.empty(1, 4, 16, device=device)
    return s, [torch.empty(8, device=device)], [torch.empty(8, device=device)]


def report() -> str:
    lines = [
        f"python  {platform.python_version()} ({sys.executable})",
        f"torch   {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton  {_version('triton')}",
        f"timm    {_version('timm')}",
    ]
    dali = _version("nvidia.dali")
    lines.append(f"DALI    {dali if not dali.startswith('not importable') else 'not installed'}")
    if _ext.available():
        lines.append("conmim._C: loaded")
        archs = _ext.cuda_archs()
        if archs:
            lines.append(f"CUDA kernels: compiled for {', '.join('sm_' + a for a in archs)}")
        else:
            lines.append("CUDA kernels: not compiled (no nvcc at build time, or CONMIM_SKIP_CUDA=1)")
    else:
        lines.append(f"conmim._C: NOT loaded: {_ext.LOAD_ERROR}")
    gpu = torch.cuda.is_available()
    lines.append(f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none visible to torch'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if gpu else [])
    lines.append("")
    lines.append("backends (auto takes the first that can run, in this order, per device):")
    for dev in devices:
        s, t_list, s_list = _probe_inputs(dev)
        tables = {
            "patch_contrast": patch_contrast_reasons(s),
            "ema_update_": ema_reasons(t_list, s_list),
        }
        for op, reasons in tables.items():
            lines.append(f"  {op} on {dev.type}:")
            for name, thunk in reasons.items():
                whys = thunk()
                verdict = "no: " + "; ".join(w.text for w in whys) if whys else "yes"
                lines.append(f"    {name:<10} {verdict}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="conmim-info",
        description="Print the versions of Python, torch, Triton, timm and DALI; whether the compiled extension "
        "loaded and the CUDA architectures it holds; the GPU torch sees; and, for the loss and the EMA on each "
        "device, which backends can run here (backend='auto' takes the first) and why the others cannot. "
        "Takes no options; attach its output to bug reports.",
    )


def main(argv=None) -> int:
    parser().parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
