"""Triton kernels and their launchers, installed as ``conmim.kernels`` (never as a top-level ``kernels``).

Importing this package does not import Triton; its modules do. ``triton_status()`` says whether they can run.
"""

from __future__ import annotations

import os


def triton_status() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton does not import ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
