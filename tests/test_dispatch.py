"""Backend dispatch: structured reasons, every reason in a forced backend's error, the warn-once for a missing
extension, and a backward that runs the forward's backend without dispatching again."""

import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import conmim
from conmim import _ext, backends, ops
from conmim.backends import Kind, Why
from tests.conftest import triton_runs_here


def test_forced_backend_names_every_reason_and_the_inputs_it_saw():
    # A CPU float64 student at d = 1100 with B above the grid limit: four independent reasons for "cuda".
    big = torch.empty(1, 3, 1100, dtype=torch.float64).expand(ops.MAX_GPU_BATCH + 1, 3, 1100)
    with pytest.raises(RuntimeError) as info:
        backends.choose("op", "cuda", ops.patch_contrast_reasons(big), {"student": big, "teacher": big})
    msg = str(info.value)
    assert f"student [{ops.MAX_GPU_BATCH + 1}, 3, 1100] torch.float64 on cpu" in msg
    expected = ["wrong device", "torch.float64 is not supported"]
    if _ext.cuda_compiled():  # the size limits come from the extension's CUDA kernels
        expected += ["d = 1100", f"B = {ops.MAX_GPU_BATCH + 1}"]
    for words in expected:
        assert words in msg, msg


def test_forced_backend_error_from_the_user_api():
    s = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    pattern = r"backend 'cuda' cannot run these inputs \(student \[2, 9, 16\] torch.float64 on cpu.*\): wrong"
    with pytest.raises(RuntimeError, match=pattern):
        conmim.patch_contrast_loss(s, s, mask, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        conmim.patch_contrast_loss(s, s, mask, backend="gpu")


def test_reasons_say_when_the_device_does_not_match():
    s = torch.empty(2, 3, 8)
    whys = ops.patch_contrast_reasons(s)["cuda"]()
    assert whys[0].kind is Kind.DEVICE
    assert all(w.kind is not Kind.DEVICE for w in ops.patch_contrast_reasons(s)["cpu"]())
    assert ops.ema_reasons([s], [s])["cuda"]()[0].kind is Kind.DEVICE


@pytest.mark.parametrize(
    "kind,warned",
    [
        (Kind.DEVICE, None),
        (Kind.LIMIT, "falling back to the PyTorch reference .*cpu: too big"),
        (Kind.EXTENSION, None),
    ],
    ids=["device", "limit", "extension"],
)
def test_auto_fallback_warning_follows_the_reason_kind(kind, warned, monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    calls = []
    monkeypatch.setattr(_ext, "warn_if_missing", lambda: calls.append(1))
    reasons = {"cpu": lambda: (Why("too big", kind),), "reference": lambda: ()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.choose(f"op-{kind.value}", "auto", reasons, {}) == "reference"
    texts = [str(w.message) for w in caught]
    if warned:
        assert len(texts) == 1 and re.search(warned, texts[0]), texts
    else:
        assert texts == [], texts  # another device's backend says nothing; a missing extension warns in _ext
    assert calls == ([1] if kind is Kind.EXTENSION else [])


def test_missing_extension_is_warned_once_where_a_cpu_call_falls_back():
    code = textwrap.dedent(
        """
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "conmim._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, conmim
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s, t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
            for _ in range(2):
                conmim.patch_contrast_loss(s, t, torch.ones(2, 5, dtype=torch.bool)).backward()
                conmim.ema_update_([torch.zeros(4)], [torch.ones(4)], 0.5)
        texts = [str(w.message) for w in caught]
        assert len(texts) == 1, texts
        assert "conmim._C did not load" in texts[0] and "pip install -e ." in texts[0], texts
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_backward_runs_the_forwards_backend_without_dispatching_again(backend, monkeypatch):
    requests, backward_backends = [], []
    real_choose, real_bwd = backends.choose, ops.patch_contrast_backward_op

    def counting_choose(op, requested, reasons, inputs):
        requests.append(requested)
        return real_choose(op, requested, reasons, inputs)

    def recording_bwd(*args):
        backward_backends.append(args[9])  # the backend argument
        return real_bwd(*args)

    monkeypatch.setattr(backends, "choose", counting_choose)
    monkeypatch.setattr(ops, "patch_contrast_backward_op", recording_bwd)
    s = torch.randn(2, 7, 8, requires_grad=True)
    conmim.patch_contrast_loss(
        s, torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool), backend=backend
    ).backward()
    want = "cpu" if backend == "auto" else backend
    assert requests.count("auto") == (1 if backend == "auto" else 0)  # auto is resolved once, in the forward
    assert backward_backends == [want]


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)")
def test_work_order_is_computed_once_for_forward_and_backward(monkeypatch):
    import conmim.kernels.patch_contrast as kernels_pc
    from conmim import loss, order

    calls = []

    def counting(mask):
        calls.append(mask.shape)
        return order.work_order(mask)

    monkeypatch.setattr(loss, "work_order", counting)
    monkeypatch.setattr(kernels_pc, "work_order", counting)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    mask = torch.rand(2, 9, generator=g) < 0.5
    a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    conmim.patch_contrast_loss(a, b, mask, backend="triton").backward()
    assert len(calls) == 1
    ra, rb = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    conmim.patch_contrast_loss(ra, rb, mask, backend="reference").backward()
    torch.testing.assert_close(a.grad, ra.grad, atol=2e-6, rtol=2e-4)
    torch.testing.assert_close(b.grad, rb.grad, atol=2e-6, rtol=2e-4)


def test_opcheck_with_a_work_order():
    from conmim.order import work_order

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    mask = torch.rand(2, 7, generator=g) < 0.5
    args = (
        s.requires_grad_(True),
        t.requires_grad_(True),
        mask,
        None,
        0.1,
        True,
        "reference",
        *work_order(mask),
    )
    torch.library.opcheck(torch.ops.conmim.patch_contrast.default, args)


# ------------------------------------------------------------------------------------- backends as objects
def test_each_op_calls_one_method_of_the_chosen_backend(monkeypatch):
    calls = []
    real = ops.BACKEND_OBJECTS["reference"]

    class Recording(ops.Reference):
        def forward(self, *args):
            calls.append("forward")
            return real.forward(*args)

        def backward(self, *args):
            calls.append("backward")
            return real.backward(*args)

        def ema_update(self, *args):
            calls.append("ema_update")
            return real.ema_update(*args)

    monkeypatch.setitem(ops.BACKEND_OBJECTS, "reference", Recording())
    s = torch.randn(2, 5, 4, requires_grad=True)
    conmim.patch_contrast_loss(
        s, torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), backend="reference"
    ).backward()
    conmim.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5, backend="reference")
    assert calls == ["forward", "backward", "ema_update"]
    for b in ops.BACKEND_OBJECTS.values():
        assert isinstance(b, ops.Backend) and b.name in backends.BACKENDS


def test_cuda_limits_and_dtype_tags_come_from_the_extension(monkeypatch):
    if not _ext.cuda_compiled():
        pytest.skip("conmim._C was built without its CUDA kernels")
    real = _ext.get()
    tags = _ext.DTYPE_TAGS
    assert tags == _ext.dtype_tags(real)
    assert tags == {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

    class Smaller:  # the real module with other limits: the dispatch must follow them
        cuda_max_dim, cuda_max_batch = 40, 3

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(_ext, "_C", Smaller())
    texts = " ".join(w.text for w in ops.patch_contrast_reasons(torch.empty(4, 3, 41))["cuda"]())
    assert "d = 41 is above the CUDA kernels' limit of 40" in texts
    assert "B = 4 is above the GPU kernels' limit of 3" in texts
    assert not any("limit" in w.text for w in ops.patch_contrast_reasons(torch.empty(3, 3, 40))["cuda"]())
