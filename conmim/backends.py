"""Explicit backend dispatch shared by every op.

``backend="auto" | "triton" | "cuda" | "cpu" | "reference"``; the environment variable ``CONMIM_BACKEND``
replaces ``"auto"``. Each backend of an op answers "why can't you run these inputs?" (None means it can). ``auto``
walks the op's priority list and takes the first that can; if it lands on the reference while a fused backend
exists for that device, it warns once, with the reasons. A forced backend that cannot run raises a RuntimeError
listing its reason.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "CONMIM_BACKEND"
FUSED = ("triton", "cuda", "cpu")

_warned: set[tuple[str, str]] = set()


def requested_backend(backend: str) -> str:
    """Validate ``backend`` and apply the environment override to "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            return env
    return backend


def choose(op: str, backend: str, reasons: dict[str, Callable[[], str | None]]) -> str:
    """Pick the backend for one call of ``op``.

    Args:
        op: op name, for messages.
        backend: the caller's request (already passed through :func:`requested_backend`).
        reasons: backend name -> thunk returning why it cannot run these inputs (None: it can), in priority
            order; "reference" must be last and always able to run.
    """
    if backend != "auto":
        if backend not in reasons:
            raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op")
        why = reasons[backend]()
        if why is not None:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run these inputs: {why}")
        return backend
    tried: list[str] = []
    for name, thunk in reasons.items():
        why = thunk()
        if why is None:
            if name == "reference" and tried:
                key = (op, "; ".join(tried))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"{op}: falling back to the PyTorch reference ({'; '.join(tried)})",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            return name
        if not why.startswith("wrong device"):
            tried.append(f"{name}: {why}")
    raise RuntimeError(f"{op}: no backend can run these inputs")


def explain(reasons: dict[str, Callable[[], str | None]]) -> dict[str, str | None]:
    """backend -> reason it cannot run (None if it can), for ``conmim.info``."""
    return {name: thunk() for name, thunk in reasons.items()}
