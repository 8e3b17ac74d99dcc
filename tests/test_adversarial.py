"""Inputs that used to slip through (issue 14, item 7): each gets a clear error or the right result."""

import numpy as np
import pytest
import torch

import conmim
from conmim import MomentumTeacher, block_masks, ema_update_, momentum_schedule, patch_contrast_loss


def _loss_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    return s.to(device), t.to(device), mask.to(device)


def _ema(momentum=0.5, teacher=None, student=None, backend="auto"):
    teacher = [torch.zeros(3, 4)] if teacher is None else teacher
    student = [torch.ones(3, 4)] if student is None else student
    ema_update_(teacher, student, momentum, backend=backend)
    return teacher[0]


ERRORS = {
    "ema-meta-momentum": (lambda: _ema(torch.tensor(0.5, device="meta")), ValueError, "got a meta tensor"),
    "ema-one-meta-pair": (
        lambda: _ema(
            teacher=[torch.zeros(3), torch.zeros(3, device="meta")],
            student=[torch.ones(3), torch.ones(3, device="meta")],
        ),
        ValueError,
        r"teacher\[1\] and student\[1\] are meta tensors",
    ),
    "ema-momentum-tensor-2": (
        lambda: _ema(torch.tensor(2.0)),
        ValueError,
        r"momentum must lie in \[0, 1\], got 2",
    ),
    "ema-momentum-tensor-neg": (
        lambda: _ema(torch.tensor(-1.0)),
        ValueError,
        r"must lie in \[0, 1\], got -1",
    ),
    "ema-momentum-tensor-nan": (lambda: _ema(torch.tensor(float("nan"))), ValueError, r"\[0, 1\], got nan"),
    "ema-momentum-float-nan": (lambda: _ema(float("nan")), ValueError, r"\[0, 1\], got nan"),
    "normalize-string": (
        lambda: patch_contrast_loss(*_loss_inputs(), normalize="False"),
        TypeError,
        "normalize must be a bool .*got str 'False'",
    ),
    "normalize-string-module": (
        lambda: conmim.FusedPatchContrastLoss(normalize="False"),
        TypeError,
        "normalize must be a bool",
    ),
    "reduction-none-on-meta": (
        lambda: patch_contrast_loss(*_loss_inputs("meta"), reduction="none"),
        ValueError,
        "reduction='none' returns one loss per masked patch.*meta",
    ),
    "reference-on-meta": (
        lambda: conmim.patch_contrast_loss_reference(*_loss_inputs("meta")),
        ValueError,
        "meta tensors do not have",
    ),
    "block-masks-float-grid": (lambda: block_masks(2, grid=3.5), ValueError, "grid must be a positive int"),
    "block-masks-negative-attempts": (
        lambda: block_masks(2, max_attempts=-1),
        ValueError,
        "max_attempts must be an int >= 1, got -1",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_gets_a_clear_error(case):
    fn, exc, pattern = ERRORS[case]
    with pytest.raises(exc, match=pattern):
        fn()


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_ema_stride0_teacher_is_refused_and_left_alone(backend):
    base = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"teacher\[0\] has stride 0"):
        _ema(teacher=[base.expand(3, 4)], backend=backend)
    assert torch.equal(base, torch.zeros(1, 4))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_stride0_teacher_in_the_loss_gives_its_dense_copys_result(backend):
    s, _, mask = _loss_inputs()
    base = torch.randn(1, 5, 8, requires_grad=True)
    dense = base.detach().clone().requires_grad_(True)
    got = patch_contrast_loss(s, base.expand(2, 5, 8), mask, backend=backend)
    want = patch_contrast_loss(s, dense.expand(2, 5, 8).contiguous(), mask, backend="reference")
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(base.grad, dense.grad, atol=1e-6, rtol=1e-5)


def test_positive_index_on_meta_tensors_gives_a_meta_loss():
    s, t, mask = _loss_inputs("meta")
    pos = torch.zeros(2, 5, dtype=torch.int64, device="meta")
    loss = patch_contrast_loss(s, t, mask, positive_index=pos)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_double_backward_says_it_is_not_supported(backend):
    s, t, mask = _loss_inputs()
    s.requires_grad_(True)
    (gs,) = torch.autograd.grad(patch_contrast_loss(s, t, mask, backend=backend), s, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported"):
        gs.sum().backward()


NUMPY_SCALARS = {
    "temperature-np-float32": lambda: patch_contrast_loss(*_loss_inputs(), np.float32(0.2)),
    "module-temperature-np-float64": lambda: conmim.FusedPatchContrastLoss(np.float64(0.2))(*_loss_inputs()),
    "momentum-np-float32": lambda: _ema(np.float32(0.25)),
    "schedule-np-int64": lambda: torch.tensor(momentum_schedule(np.int64(3), np.int64(10))),
    "teacher-np-int64-step": lambda: torch.tensor(
        MomentumTeacher(torch.nn.Linear(2, 2), total_steps=10).momentum(np.int64(3))
    ),
    "block-masks-np-int64": lambda: block_masks(
        np.int64(2), grid=np.int64(6), num_masking_patches=np.int64(9)
    ),
}
PYTHON_SCALARS = {
    "temperature-np-float32": lambda: patch_contrast_loss(*_loss_inputs(), float(np.float32(0.2))),
    "module-temperature-np-float64": lambda: conmim.FusedPatchContrastLoss(0.2)(*_loss_inputs()),
    "momentum-np-float32": lambda: _ema(0.25),
    "schedule-np-int64": lambda: torch.tensor(momentum_schedule(3, 10)),
    "teacher-np-int64-step": lambda: torch.tensor(
        MomentumTeacher(torch.nn.Linear(2, 2), total_steps=10).momentum(3)
    ),
    "block-masks-np-int64": lambda: block_masks(2, grid=6, num_masking_patches=9),
}


@pytest.mark.parametrize("case", list(NUMPY_SCALARS))
def test_numpy_scalars_are_accepted_like_python_ones(case):
    torch.manual_seed(0)
    got = NUMPY_SCALARS[case]()
    torch.manual_seed(0)
    want = PYTHON_SCALARS[case]()
    assert torch.equal(got, want)
