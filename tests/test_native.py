"""The CPU C++ loss through its launcher (conmim.native), every (student, teacher) dtype pair against the float64
reference: each input read in its own dtype, each gradient returned in its input's dtype."""

import pytest
import torch

from conmim import _ext, native
from tests.native_cases import (
    PAIRS,
    SATURATION,
    assert_case_within_rule,
    assert_close_to,
    inputs,
    loss_tol_dtype,
    pair_id,
    reference,
    rel_error,
    saturation_case,
)
from tests.test_patch_contrast import MASKS, make_mask

pytestmark = pytest.mark.skipif(not _ext.available(), reason="conmim._C is not built")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("need_teacher", [True, False], ids=["teacher-grad", "student-only"])
def test_cpu_loss_every_dtype_pair(pair, kind, need_teacher):
    B, N, D = 3, 37, 24
    s, t, grad, _ = inputs(B, N, D, pair, seed=N)
    mask = make_mask(kind, B, N, seed=D)
    loss, lse = native.patch_contrast_forward_cpu(s, t, mask, None, 0.1, True)
    ds, dt = native.patch_contrast_backward_cpu(grad, s, t, mask, None, lse, 0.1, True, need_teacher)
    want_loss, want_ds, want_dt = reference(s, t, mask, None, 0.1, True, grad)
    acc = torch.float64 if pair[0] == torch.float64 else torch.float32
    assert loss.dtype == lse.dtype == acc and ds.dtype == pair[0]
    assert_close_to(loss, want_loss, loss_tol_dtype(pair), "loss", "loss")
    assert_close_to(ds, want_ds, pair[0], "grad", "d_student")
    if need_teacher:
        assert dt.dtype == pair[1]
        assert_close_to(dt, want_dt, pair[1], "grad", "d_teacher")
    else:
        assert dt is None


@pytest.mark.parametrize(
    "pair", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=pair_id
)
def test_cpu_mixed_pair_strided_positive_index_unnormalized(pair):
    B, N, D = 2, 19, 13
    s, t, grad, pos = inputs(B, N, D, pair, seed=5, positive=True)
    s, t = s.transpose(1, 2).contiguous().transpose(1, 2), t[:, :, :]  # feature stride != 1 for the student
    grad = grad[:, :1].expand(B, N)  # a stride-0 cotangent
    mask = make_mask("ragged", B, N, seed=3)
    loss, lse = native.patch_contrast_forward_cpu(s, t, mask, pos, 0.2, False)
    ds, dt = native.patch_contrast_backward_cpu(grad, s, t, mask, pos, lse, 0.2, False, True)
    want_loss, want_ds, want_dt = reference(s, t, mask, pos, 0.2, False, grad)
    assert_close_to(loss, want_loss, loss_tol_dtype(pair), "loss", "loss")
    assert_close_to(ds, want_ds, pair[0], "grad", "d_student")
    assert_close_to(dt, want_dt, pair[1], "grad", "d_teacher")


@pytest.mark.parametrize(
    "pair", [(torch.float64, torch.float32), (torch.float32, torch.float64)], ids=pair_id
)
def test_float64_mixes_with_nothing(pair):
    s, t, _, _ = inputs(1, 4, 8, pair)
    with pytest.raises(ValueError, match="float64 pairs only with float64"):
        native.patch_contrast_forward_cpu(s, t, torch.ones(1, 4, dtype=torch.bool), None, 0.1, True)


def test_loss_call_fields_are_named():
    call = native._loss_call(
        *inputs(2, 5, 8, (torch.bfloat16, torch.float16))[:2], None, 0.5, False, nthreads=3
    )
    assert (call.B, call.N, call.D, call.inv_tau, call.normalize, call.nthreads) == (2, 5, 8, 2.0, False, 3)
    assert (call.student_dtype, call.teacher_dtype) == (
        _ext.DTYPE_TAGS[torch.bfloat16],
        _ext.DTYPE_TAGS[torch.float16],
    )
    assert call.student_stride == [40, 8, 1] and call.positive_index == 0
    with pytest.raises(AttributeError):
        native._loss_call(
            *inputs(1, 2, 3, (torch.float32, torch.float32))[:2], None, 0.1, True, no_such_field=1
        )


# ------------------------------------------------------------- accuracy at large logits and a saturated softmax
@pytest.mark.parametrize("kind", SATURATION)
def test_cpu_accuracy_with_large_logits_and_saturated_softmax(kind):
    # DESIGN.md's rule: the fused result's error against float64 is at most 2x plain torch's error in float32
    # (the reference computed in float32), plus a small floor.
    s, t, tau, normalize = saturation_case(kind)
    mask = make_mask("ragged", 2, 40, seed=2)
    grad = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    loss, lse = native.patch_contrast_forward_cpu(s, t, mask, None, tau, normalize)
    ds, dt = native.patch_contrast_backward_cpu(grad, s, t, mask, None, lse, tau, normalize, True)
    assert_case_within_rule(s, t, mask, tau, normalize, grad, loss, ds, dt)


def test_cpu_loss_is_never_negative_at_tiny_temperature():
    # The case: tau = 1e-8 used to give a per-row loss of -0.34.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    loss, _ = native.patch_contrast_forward_cpu(s, t, mask, None, 1e-8, True)
    want = reference(s, t, mask, None, 1e-8, True, torch.zeros(2, 7))[0]
    assert (loss >= 0).all()
    assert rel_error(loss, want) < 1e-6
