"""The one place that loads the compiled extension conmim._C.

A load failure is recorded (``LOAD_ERROR``), warned once with what to do, and reported by ``python -m conmim.info``;
the package keeps working through its other backends.
"""

from __future__ import annotations

import warnings

import torch

try:
    from conmim import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
    if not hasattr(_C, "dtype_tags"):  # a build from before the extension exported its tables
        _C, LOAD_ERROR = None, "conmim._C is older than these sources (it exports no dtype_tags)"
except ImportError as exc:  # the extension was not built, or was built for another Python
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_warned = False


def dtype_tags(module=None) -> dict:
    """torch dtype -> the tag csrc/common.h gives it, as the extension exports them ({} without it)."""
    module = _C if module is None else module
    if module is None:
        return {}
    return {getattr(torch, name): tag for name, tag in module.dtype_tags.items()}


DTYPE_TAGS = dtype_tags()


def available() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.with_cuda)


def cuda_archs() -> list[str]:
    if _C is None or not _C.with_cuda:
        return []
    return [a for a in _C.cuda_archs().split(",") if a]


def why_unavailable() -> str | None:
    """None when the extension is loaded, else a sentence saying why not and what to do."""
    if _C is not None:
        return None
    return f"conmim._C did not load ({LOAD_ERROR}); rebuild it with `pip install -e .`"


def warn_if_missing() -> None:
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(why_unavailable(), RuntimeWarning, stacklevel=3)


def get():
    """The loaded module; raises RuntimeError saying why when it is missing."""
    if _C is None:
        raise RuntimeError(why_unavailable())
    return _C
