"""Explicit backend dispatch shared by every op.

``backend="auto" | "triton" | "cuda" | "cpu" | "reference"``; the environment variable ``CONMIM_BACKEND``
replaces ``"auto"``. Each backend of an op answers "why can't you run these inputs?" with every reason it has
(an empty tuple means it can). ``auto`` walks the op's priority list and takes the first that can; if it lands on
the reference while a fused backend exists for that device, it warns once, with the reasons (a missing
conmim._C is warned once by conmim._ext instead). A forced backend that cannot run raises a RuntimeError listing
all its reasons and the inputs it saw.
"""

from __future__ import annotations

import enum
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from conmim import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "CONMIM_BACKEND"


class Kind(enum.Enum):
    DEVICE = "device"  # the backend runs on another kind of device: auto skips it without a word
    EXTENSION = "extension"  # conmim._C did not load: conmim._ext warns once, with the fix
    LIMIT = "limit"  # these inputs (dtype, size, layout) or a missing package are outside what it runs


class Why(NamedTuple):
    """One reason a backend cannot run some inputs."""

    text: str
    kind: Kind = Kind.LIMIT


Reasons = dict[str, Callable[[], tuple[Why, ...]]]

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


def describe(inputs: dict) -> str:
    """ "name [shape] dtype on device" for tensors, a count and dtypes for lists of them: what a call saw."""

    def one(v) -> str:
        if isinstance(v, torch.Tensor):
            return f"[{', '.join(str(s) for s in v.shape)}] {v.dtype} on {v.device}"
        dtypes = sorted({str(t.dtype) for t in v})
        devices = sorted({str(t.device) for t in v})
        return f"{len(v)} tensors ({', '.join(dtypes)}) on {', '.join(devices)}"

    return ", ".join(f"{name} {one(v)}" for name, v in inputs.items())


def choose(op: str, backend: str, reasons: Reasons, inputs: dict) -> str:
    """Pick the backend for one call of ``op``.

    Args:
        op: op name, for messages.
        backend: the caller's request (already passed through :func:`requested_backend`).
        reasons: backend name -> thunk returning every reason it cannot run these inputs (empty: it can), in
            priority order; "reference" must be last and always able to run.
        inputs: name -> tensor or list of tensors, described in the error of a forced backend.
    """
    if backend != "auto":
        if backend not in reasons:
            raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op")
        whys = reasons[backend]()
        if whys:
            raise RuntimeError(
                f"{op}: backend {backend!r} cannot run these inputs ({describe(inputs)}): "
                + "; ".join(w.text for w in whys)
            )
        return backend
    tried: list[str] = []
    for name, thunk in reasons.items():
        whys = thunk()
        if not whys:
            if name == "reference" and tried:
                key = (op, "; ".join(tried))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"{op}: falling back to the PyTorch reference ({key[1]})", RuntimeWarning, 4
                    )
            return name
        kinds = {w.kind for w in whys}
        if Kind.DEVICE in kinds:
            continue
        if Kind.EXTENSION in kinds:
            _ext.warn_if_missing()
        shown = [w.text for w in whys if w.kind is Kind.LIMIT]
        if shown:
            tried.append(f"{name}: {', '.join(shown)}")
    raise RuntimeError(f"{op}: no backend can run these inputs ({describe(inputs)})")
