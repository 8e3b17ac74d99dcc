"""The package as installed: the extension, conmim.kernels (never a top-level `kernels`), conmim.info, the wheel,
and incremental rebuilds."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import conmim
from conmim import _ext

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def test_extension_and_kernels_import(tmp_path):
    proc = _run("import conmim, conmim._C, conmim.kernels; print(conmim.kernels.__name__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "conmim.kernels"
    assert _ext.available(), _ext.LOAD_ERROR


def test_kernels_is_not_a_top_level_module(tmp_path):
    proc = _run("import importlib.util as u; print(u.find_spec('kernels'))", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = proc.stdout.strip()
    assert spec == "None" or str(ROOT) not in spec, (
        f"our kernels/ is importable as a top-level module: {spec}"
    )


def test_info_reports_backends_and_cuda_architectures(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "conmim.info"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for words in (
        "torch",
        "triton",
        "conmim._C: loaded",
        "patch_contrast on cpu",
        "ema_update_ on cpu",
        "reference  yes",
    ):
        assert words in out, out
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if nvcc and os.environ.get("CONMIM_SKIP_CUDA", "0") in ("", "0"):
        assert "CUDA kernels: compiled for sm_80, sm_90" in out, out
    else:
        assert "CUDA kernels: not compiled" in out, out


@pytest.mark.slow
def test_wheel_installs_conmim_kernels_and_no_top_level_kernels(tmp_path):
    env = {**os.environ, "CONMIM_SKIP_CUDA": "1", "CONMIM_BUILD_DIR": str(tmp_path / "cmake")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "building without CUDA kernels: CONMIM_SKIP_CUDA is set" in proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("conmim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "conmim/kernels/patch_contrast.py" in names and "conmim/kernels/ema.py" in names
    assert any(n.startswith("conmim/_C") and n.endswith(".so") for n in names)
    assert not any(n.startswith("kernels/") for n in names), names
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import conmim, conmim.kernels, conmim._C; print(conmim.__file__); print(conmim.kernels.__file__); "
        "print(conmim._C.with_cuda)"
    )
    proc = _run(code, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    conmim_file, kernels_file, with_cuda = proc.stdout.split()
    assert conmim_file.startswith(str(site)) and kernels_file.startswith(str(site / "conmim" / "kernels"))
    assert with_cuda == "False"


@pytest.mark.slow
def test_touching_one_source_rebuilds_only_it(tmp_path):
    """Configure and build the CPU part in a fresh Ninja tree, touch one source, and ask Ninja what it would
    redo: that one object and the link."""
    import pybind11

    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    assert cmake and ninja, "cmake and ninja come with the test extra"
    build = tmp_path / "build"
    subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
         "-DCONMIM_WITH_CUDA=OFF", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path / 'out'}"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    subprocess.run([ninja, "-C", str(build)], check=True, capture_output=True, timeout=600)
    src = ROOT / "csrc" / "cpu" / "ema.cpp"
    os.utime(src)
    dry = subprocess.run([ninja, "-C", str(build), "-n"], capture_output=True, text=True, timeout=120)
    steps = [ln for ln in dry.stdout.splitlines() if ln.startswith("[")]
    compiles = [ln for ln in steps if "Building" in ln]
    assert len(compiles) == 1 and "ema.cpp" in compiles[0], dry.stdout
    assert all("Linking" in ln for ln in steps if ln not in compiles), dry.stdout


def test_version_is_the_packages():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert conmim.__version__ == project["version"]
