"""Build conmim._C: setup.py drives CMakeLists.txt through Ninja.

Environment variables:
  CONMIM_SKIP_CUDA=1          build the CPU part only, even when nvcc is found.
  CONMIM_CUDA_ARCHS="80;90"   CUDA architectures to compile for (CMake syntax; default "80;90").
  CONMIM_CPU_ARCH=native      value for -march= on the C++ kernels (default "native"; e.g. "x86-64-v3" for a
                              portable wheel).
  CONMIM_BUILD_DIR=path       where the CMake build tree lives (default build/cmake-<python tag>), kept between
                              builds so that touching one source rebuilds only it.
  CONMIM_BUILD_TYPE=Release   CMake build type.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    """Return (path, None) for a usable nvcc, or (None, reason)."""
    if os.environ.get("CONMIM_SKIP_CUDA", "0") not in ("", "0"):
        return None, "CONMIM_SKIP_CUDA is set"
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c, None
    return None, "nvcc not found (put it on PATH or set CUDACXX / CUDA_HOME)"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir = Path(os.environ.get("CONMIM_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("CONMIM_BUILD_TYPE", "Release")

        cmake = shutil.which("cmake")
        ninja = shutil.which("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError(
                "conmim: building needs cmake and ninja (pip installs both as build requirements)"
            )

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCONMIM_CPU_ARCH={os.environ.get('CONMIM_CPU_ARCH', 'native')}",
        ]
        nvcc, why = _find_nvcc()
        if nvcc is None:
            print(f"conmim: building without CUDA kernels: {why}", flush=True)
            args.append("-DCONMIM_WITH_CUDA=OFF")
        else:
            archs = os.environ.get("CONMIM_CUDA_ARCHS", "80;90")
            args += ["-DCONMIM_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCONMIM_CUDA_ARCHS={archs}"]

        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    packages=[*find_packages(include=["conmim", "conmim.*"]), "conmim.kernels"],
    package_dir={"conmim": "conmim", "conmim.kernels": "kernels"},
    package_data={"conmim": ["configs/*.yaml", "configs/finetune/*.yaml"]},
    ext_modules=[CMakeExtension("conmim._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
