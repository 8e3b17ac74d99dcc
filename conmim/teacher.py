"""Momentum teacher: ``MomentumTeacher`` and the fused ``ema_update_``."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from conmim import backends
from conmim._validate import check_momentum, check_tensor_lists
from conmim.ops import ema_update_op
from conmim.reference import momentum_schedule

_ALIGN = 4  # fp32 elements: every parameter view starts on a 16-byte boundary of the flat buffer


def ema_update_(teacher, student, momentum, backend: str = "auto") -> None:
    """In place, for every pair: ``teacher <- teacher + (1 - m) (student - teacher)`` (``torch._foreach_lerp_``
    semantics, fp32 arithmetic, stored in each teacher tensor's dtype).

    Args:
        teacher: list/tuple of floating tensors (fp32/bf16/fp16; fp64 on cpu/reference), contiguous for the
            fused backends (a non-contiguous one makes ``auto`` fall back to the reference, with a warning).
        student: tensors of the same shapes, any float dtype, any strides (non-contiguous ones are copied).
        momentum: float in [0, 1], or a 0-d float tensor (on the GPU it is read on the device: no host sync).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """
    check_tensor_lists(teacher, student)
    check_momentum(momentum)
    name = backends.requested_backend(backend)
    teacher, student = list(teacher), [s.detach() for s in student]
    if isinstance(momentum, torch.Tensor):
        ema_update_op(teacher, student, 0.0, momentum.detach(), name)
    else:
        ema_update_op(teacher, student, float(momentum), None, name)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class MomentumTeacher(nn.Module):
    """EMA copy of a student network, updated in one fused pass per step; an ``nn.Module``.

    ``teacher(images)`` runs the copied student (``self.module``) on unmasked images, so for a
    :class:`conmim.models.ConMIMEncoder` it returns the patch features ``[B, N, d]`` the loss compares with.
    ``state_dict``, ``load_state_dict``, ``to``/``cuda`` and ``train``/``eval`` work as for any module.

    The teacher's parameters are fp32 views into one flat buffer (``self.flat``), so an update is a single
    kernel over all of them whatever the student's dtype; a device move or dtype cast rebuilds the buffer on the
    new device, still fp32. Its gradients are off; it starts in train mode (ConMIM's teacher uses batch
    statistics in its BatchNorm layers). Buffers are not averaged (ConMIM); with ``copy_buffers=True`` they are
    copied from the student at every update.

    Step convention: ``update(student, step)`` uses the momentum scheduled at ``step``, counted from 0 (the
    first update after the first optimizer step is ``step=0``; ``total_steps`` reaches ``final_momentum``).

    Args:
        student: the student module (DDP and torch.compile wrappers are unwrapped).
        base_momentum, final_momentum: the cosine schedule's ends (0.996 -> 1.0).
        total_steps: steps of the whole run (the schedule reaches ``final_momentum`` there).
        copy_buffers: copy the student's buffers into the teacher at each update.
        backend: EMA backend ("auto", "triton", "cuda", "cpu", "reference").
    """

    def __init__(
        self,
        student: nn.Module,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        total_steps: int = 1,
        copy_buffers: bool = False,
        backend: str = "auto",
    ):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if any(isinstance(p, DTensor) for p in student.parameters()):
            raise TypeError(
                "student is sharded (FSDP) but MomentumTeacher keeps a whole copy in one flat buffer: build the "
                "teacher of a sharded student with conmim.fsdp.prepare (a ShardedTeacher, updated on the local shards)"
            )
        momentum_schedule(0, total_steps, base_momentum, final_momentum)  # validates the schedule's arguments
        backends.requested_backend(backend)
        super().__init__()
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.total_steps = int(total_steps)
        self.copy_buffers = bool(copy_buffers)
        self.backend = backend
        self.module = copy.deepcopy(_unwrap(student))
        self.module.requires_grad_(False)
        self.module.train()
        self._checked_student: int | None = None  # the student module whose shapes were checked (its id)
        self._flatten()
        self.register_load_state_dict_post_hook(_keep_flat)

    def _flatten(self) -> None:
        params = list(self.module.parameters())
        device = params[0].device if params else torch.device("cpu")
        sizes = [p.numel() for p in params]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += (n + _ALIGN - 1) // _ALIGN * _ALIGN
        flat = torch.zeros(total, dtype=torch.float32, device=device)
        with torch.no_grad():
            for p, off, n in zip(params, offsets, sizes):
                view = flat[off : off + n].view(p.shape)
                view.copy_(p.detach().to(device=device, dtype=torch.float32))
                p.data = view
        self.flat = flat
        self.params = params
        self._checked_student = None

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def _apply(self, fn, recurse=True):
        """Module moves and casts (``to``, ``cuda``, ``half``...) act per parameter; the flat fp32 buffer is then
        rebuilt from the moved parameters."""
        super()._apply(fn, recurse)
        self._flatten()
        return self

    def momentum(self, step: int) -> float:
        """The scheduled momentum at ``step``."""
        return momentum_schedule(step, self.total_steps, self.base_momentum, self.final_momentum)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int | None = None, momentum=None):
        """One EMA step from ``student`` and the momentum it used: the schedule's at ``step``, or ``momentum`` if
        given (a float, or a 0-d device tensor, e.g. to replay the update in a CUDA graph).

        The teacher's own flat buffer needs no checks; the student's parameter shapes are checked against it
        the first time a given student module is passed."""
        if (step is None) == (momentum is None):
            raise ValueError("update needs exactly one of step (scheduled momentum) or momentum")
        m = self.momentum(step) if momentum is None else momentum
        src = _unwrap(student)
        student_params = list(src.parameters())
        if momentum is not None:
            check_momentum(momentum)  # the schedule's own values are valid by construction
        if self._checked_student != id(src):
            if len(student_params) != len(self.params):
                raise ValueError(
                    f"student has {len(student_params)} parameters but the teacher has {len(self.params)}: "
                    "pass the same architecture the teacher was built from"
                )
            check_tensor_lists(self.params, student_params)
            self._checked_student = id(src)
        name = backends.requested_backend(self.backend)
        if isinstance(m, torch.Tensor):
            ema_update_op(self.params, student_params, 0.0, m.detach(), name)
        else:
            ema_update_op(self.params, student_params, float(m), None, name)
        if self.copy_buffers:
            for tb, sb in zip(self.module.buffers(), src.buffers()):
                tb.copy_(sb)
        return m


def _keep_flat(teacher: MomentumTeacher, _incompatible) -> None:
    """After ``load_state_dict``: values are copied into the flat views, unless ``assign=True`` replaced the
    parameters, in which case the flat layout is rebuilt."""
    if not all(_is_view_of(p, teacher.flat) for p in teacher.module.parameters()):
        teacher._flatten()


def _is_view_of(p: torch.Tensor, flat: torch.Tensor) -> bool:
    base = flat.data_ptr()
    end = base + flat.numel() * flat.element_size()
    return base <= p.data_ptr() < end or p.numel() == 0
