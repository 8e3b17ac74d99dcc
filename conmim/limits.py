"""Numerical gates shared by the Triton and CUDA kernels, defined once here: the Triton launchers read them
directly, the CUDA launchers pass the decision in (conmim._C.LossCall.exact_logits). The CUDA kernels' own size
limits live in C++ and are exported by the extension (conmim._C.cuda_max_dim, cuda_max_batch)."""

from __future__ import annotations

# 3xTF32 keeps ~21-22 bits of each fp32 operand, several times fp32's rounding error on a logit; multiplied by
# large logits (small temperatures, unnormalised rows) it breaks the float64 rule (a fused gradient's error at
# most 2x that of plain fp32 torch). Measured on the CUDA kernels' CPU execution, whose TF32 rounding is exact:
# 3xTF32 logits failed at tau = 1e-3, 1e-4, 1e-5 and for unnormalised rows of norm 30 (4-6x torch's error),
# and passed at tau = 0.05 with a saturated softmax. With normalized rows |logit| <= 1 / tau, so 3xTF32 logits
# only there and for tau >= TF32X3_MIN_TAU; else plain fp32 (FMA).
TF32X3_MIN_TAU = 0.05


def exact_logits(normalize: bool, temperature: float) -> bool:
    """Whether the logits of a pair with an fp32 side run in plain fp32 (FMA) rather than 3xTF32."""
    return not (normalize and temperature >= TF32X3_MIN_TAU)
