"""Shared test setup.

Without a GPU, Triton kernels run on the CPU through its interpreter: TRITON_INTERPRET must be set before Triton is
first imported, hence here, before anything imports conmim.kernels.
"""

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

# Scan indexes, locks and the bundled samples go to a cache folder of this test session (subprocesses and ranks
# inherit it), never to the user's ~/.cache/conmim.
_SESSION_CACHE = tempfile.mkdtemp(prefix="conmim-test-cache-")
os.environ["XDG_CACHE_HOME"] = _SESSION_CACHE
os.environ.pop("CONMIM_SAMPLES", None)
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances keyed by input dtype: (loss atol/rtol, gradient atol/rtol), against the fp32/fp64 reference
# computed from the same (rounded) inputs. Low-precision gradients are compared after their final rounding.
TOL = {
    torch.float64: dict(loss=(1e-10, 1e-10), grad=(1e-10, 1e-9)),
    torch.float32: dict(loss=(2e-5, 2e-5), grad=(2e-6, 2e-4)),
    torch.bfloat16: dict(loss=(2e-4, 2e-4), grad=(2e-4, 1.6e-2)),
    torch.float16: dict(loss=(2e-4, 2e-4), grad=(2e-5, 2e-3)),
}

requires_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"
)


def assert_within_rule(what: str, got, plain, exact, floor: float = 0.0, cap: float | None = None) -> None:
    """DESIGN.md's tolerance rule, the one implementation the tests share: the fused result's error against the
    float64 ``exact`` is at most 2x the error of ``plain`` (the plain torch computation in the same dtype) plus
    ``floor`` (max norms, absolute). ``cap``, where given, also bounds it absolutely: used where plain torch
    itself loses the digits under test (a saturated softmax), so that 2x plain alone would prove little."""
    assert not torch.isnan(got).any(), f"{what}: NaN (an element left unwritten?)"
    want = exact.double()
    ours = (got.double() - want).abs().max().item() if want.numel() else 0.0
    theirs = (plain.double() - want).abs().max().item() if want.numel() else 0.0
    bound = (2 * theirs if cap is None else min(2 * theirs, cap)) + floor
    assert ours <= bound, f"{what}: error {ours:.3g} vs plain torch {theirs:.3g} (bound {bound:.3g})"


def triton_runs_here() -> bool:
    """Triton kernels can run: on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    from conmim.kernels import interpreting, triton_status

    return triton_status() is None and (HAS_GPU or interpreting())


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """32 MNIST digits in class folders (from the bundled samples)."""
    from conmim.data import samples

    base = tmp_path_factory.mktemp("digits")
    built = samples.build(base / "samples", photos=False)
    root = base / "digits"
    files = sorted(Path(built["mnist_train"]).rglob("*.png"))[::125][:32]
    for f in files:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / f.parent.name / f.name).write_bytes(f.read_bytes())
    return root


@pytest.fixture(scope="session")
def labelled_digits(digits, tmp_path_factory) -> Path:
    """The 32 digits as a labelled split: train/ (even files) and val/ (odd files), class sub-folders."""
    data = tmp_path_factory.mktemp("labelled")
    files = sorted(Path(digits).rglob("*.png"))
    for split, part in (("train", files[::2]), ("val", files[1::2])):
        for f in part:
            (data / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            (data / split / f.parent.name / f.name).write_bytes(f.read_bytes())
    return data


def tiny(digits, out, **kw):
    """A resolved tiny_demo config on the 32-digit folder, small and quiet."""
    over = dict(
        data=str(digits),
        out=str(out),
        batch_size=8,
        epochs=2,
        num_workers=0,
        loader="torch",
        progress=False,
        log_every=1,
        head_hidden=64,
        head_out=32,
        warmup_epochs=0.0,
        lr=1e-3,
        checkpoint_every=0,
        eval_every=0,  # the preset's k-NN monitor is tested on its own
    )
    over.update(kw)
    from conmim import config as cfgmod

    return cfgmod.resolve(cfgmod.TrainConfig, "tiny_demo", over)


def dcp_tensors(path) -> dict:
    """Every tensor of a checkpoint folder (weights, optimizer state, run state), whole, in one process."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    flat = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if hasattr(m, "properties")
    }
    with warnings.catch_warnings():  # DCP: "assuming the intent is to load in a single process", as it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    return flat


def loss_backends_here() -> list:
    """The loss backends that can run on this machine's CPU, as pytest params (Triton only under its interpreter)."""
    skip = pytest.mark.skipif(
        not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)"
    )
    return ["reference", "cpu", pytest.param("triton", marks=skip)]


# The slow layer, beside the tests that carry @pytest.mark.slow themselves: node ids (``*`` matches anything)
# of the longest default tests, measured with ``pytest --durations`` on 2 cores. Plain ``pytest`` deselects them
# (addopts in pyproject.toml); ``pytest -m slow`` and CI run them. Listed here rather than in each file so the
# default layer's budget is decided in one place; tests/test_docs.py checks that every entry names a test.
SLOW_TESTS = (
    # a second build of the extension (about a minute) and 150 cases on the CUDA-on-CPU executor
    "tests/test_cuda_on_cpu.py::*",
    # every Triton kernel compiled for sm_90 (its setup alone took the longest of any default test)
    "tests/test_triton_sm90.py::*",
    # the Triton interpreter at its largest shapes; the small shapes stay in the default layer
    "tests/test_patch_contrast.py::test_triton_backend[37-24-*]",
    "tests/test_patch_contrast.py::test_triton_backend[70-40-*]",
    "tests/test_patch_contrast.py::test_triton_backward_recomputed_or_stored[full-*-recompute]",
    "tests/test_patch_contrast.py::test_cpu_backend_gradcheck_float64",
    # torch.compile of a whole drop-in step
    "tests/test_mixed_dtypes.py::test_drop_in_bf16_autocast_student_fp32_teacher_compiled[*]",
    # subprocesses that import torch and rebuild state from scratch, or evaluate whole digit splits
    "tests/test_dispatch.py::test_missing_extension_is_warned_once_where_a_cpu_call_falls_back",
    "tests/test_evaluate.py::test_eval_states_the_baseline_and_the_json",
    "tests/test_scaleout.py::test_knn_and_linear_eval_on_digits",
    "tests/test_scaleout.py::test_export_loads_in_timm",
)


def _pattern(node_glob: str):
    import re

    return re.compile(".*".join(re.escape(part) for part in node_glob.split("*")) + r"\Z")


_SLOW_RES = [_pattern(p) for p in SLOW_TESTS]


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(r.match(item.nodeid) for r in _SLOW_RES):
            item.add_marker(pytest.mark.slow)
