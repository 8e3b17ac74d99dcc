"""Builds conmim._C with the CUDA kernels compiled as host C++ against the CPU executor (cuda_on_cpu.h), for the
tests. Objects are cached by content under build/cuda_on_cpu/, so a test session (or CI run) compiles each source
once, and a mutated copy of one kernel source recompiles only that file."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = ROOT / "build" / "cuda_on_cpu"
CUDA_SOURCES = ["csrc/cuda/patch_contrast.cu", "csrc/cuda/ema.cu"]
HOST_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/patch_contrast.cpp", "csrc/cpu/ema.cpp"]


def cuda_include() -> Path | None:
    """A directory holding cuda_runtime.h and cuda_bf16.h (the CUDA toolkit's, found beside nvcc or by CUDA_HOME,
    or the one pip's nvidia-cuda-runtime wheel installs), or None."""
    places = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        places.append(str(Path(nvcc).resolve().parents[1]))
    places += [str(Path(p) / "nvidia" / "cuda_runtime") for p in sys.path if p]
    for p in places:
        if (
            p
            and (Path(p) / "include" / "cuda_bf16.h").is_file()
            and (Path(p) / "include" / "cuda_runtime.h").is_file()
        ):
            return Path(p) / "include"
    return None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def why_unavailable() -> str | None:
    if _compiler() is None:
        return "no C++ compiler (g++) to build the CPU execution of the CUDA kernels"
    if cuda_include() is None:
        return (
            "no CUDA headers (cuda_runtime.h, cuda_bf16.h) found: set CUDA_HOME or install the CUDA toolkit"
        )
    return None


def _flags(src_dir: Path) -> list[str]:
    import pybind11

    return [
        "-std=c++17", "-O1", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-w",
        f"-I{src_dir}", f"-I{HERE}", f"-I{cuda_include()}", f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        "-DCONMIM_WITH_CUDA=1", "-DCONMIM_CUDA_ON_CPU=1", '-DCONMIM_CUDA_ARCHS_STR="cpu"',
    ]  # fmt: skip


def _compile(src: Path, src_dir: Path, extra: list[str]) -> Path:
    flags = _flags(src_dir) + extra
    headers = sorted([*src_dir.rglob("*.h"), *src_dir.rglob("*.cuh"), *HERE.glob("*.h")])
    # The key: the flags (with the source folder left out: a copy of csrc shares the objects it does not change),
    # the source and every header.
    h = hashlib.sha256(" ".join(flags).replace(str(src_dir), "csrc").encode() + src.read_bytes())
    for p in headers:
        h.update(p.read_bytes())
    obj = CACHE / "obj" / f"{src.stem}-{h.hexdigest()[:20]}.o"
    if not obj.exists():
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        subprocess.run([_compiler(), *flags, "-c", *lang, str(src), "-o", str(tmp)], check=True)
        tmp.replace(obj)
    return obj


def build(src_dir: Path = ROOT / "csrc") -> Path:
    """Path of the built module for the sources under src_dir (the repository's csrc by default)."""
    objs = [_compile(src_dir.parent / s, src_dir, []) for s in HOST_SOURCES]
    # Subscripts of arrays with a known bound are checked; executor.cpp handles the reports.
    objs += [_compile(src_dir.parent / s, src_dir, ["-fsanitize=bounds"]) for s in CUDA_SOURCES]
    objs.append(_compile(HERE / "executor.cpp", src_dir, []))
    key = hashlib.sha256("".join(o.name for o in objs).encode()).hexdigest()[:20]
    out = CACHE / key / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"tmp{os.getpid()}{out.name}")
        subprocess.run([_compiler(), "-shared", "-fopenmp", *map(str, objs), "-o", str(tmp)], check=True)
        tmp.replace(out)
    return out


def load(path: Path):
    """Imports the module built at `path` (a conmim._C stand-in; its classes are module-local)."""
    spec = importlib.util.spec_from_file_location(f"cuda_on_cpu_{path.parent.name}._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
