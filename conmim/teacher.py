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


def ema_update_(teacher, student, momentum, backend: str = "auto") -> None:
    """In place, for every pair: ``teacher <- teacher + (1 - m) (student - teacher)`` (``torch._foreach_lerp_``
    semantics, fp32 arithmetic, stored in each teacher tensor's dtype).

    Args:
        teacher: list/tuple of floating tensors (fp32/bf16/fp16; fp64 on cpu/reference), dense for the fused
            backends (contiguous in any order of dimensions: row-major, channels_last, transposed; one with gaps
            or overlaps makes ``auto`` fall back to the reference, with a warning).
        student: tensors of the same shapes, any float dtype, any strides (read in place where the layout is
            its teacher's, otherwise copied into that layout on each call).
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
    """EMA copy of a student network, updated in one fused launch per step; an ``nn.Module``.

    ``teacher(images)`` runs the copied student (``self.module``) on unmasked images, so for a
    :class:`conmim.models.ConMIMEncoder` it returns the patch features ``[B, N, d]`` the loss compares with.
    ``state_dict``, ``load_state_dict`` (``assign=True`` too), ``to``/``cuda`` and ``train``/``eval`` work as for
    any module. Its parameters start as fp32 copies whatever the student's dtype (an update moves a teacher
    weight by (1 - m) ~ 0.4% of its distance to the student, below bf16's resolution). Its gradients are off; it
    starts in train mode (ConMIM's teacher uses batch statistics in its
    BatchNorm layers) and keeps whatever mode it is then given. Buffers are not averaged (ConMIM); with
    ``copy_buffers=True`` they are copied from the student at every update.

    One teacher for every parallel strategy: for a sharded (FSDP2) student, build the teacher from the student
    before sharding and shard ``teacher.module`` on the same mesh (``conmim.parallel.Sharded`` does both);
    ``update`` then averages each rank's local shards, with no communication. The update is one launch of the
    EMA kernel over the table of all parameter pairs, whatever their number and dtypes.

    Every update compares the student's and the teacher's parameter lists (count, shapes, dtypes, devices,
    storage) with those last validated, on the host only, and validates them again when anything changed (a
    replaced parameter, a module moved or loaded with ``assign=True``, another student): a mismatch is an error,
    never an out-of-bounds read or a silent no-op.

    Step convention: ``update(student, step)`` uses the momentum scheduled at ``step``, counted from 0 (the
    first update after the first optimizer step is ``step=0``; ``total_steps`` reaches ``final_momentum``).

    Args:
        student: the student module (DDP and torch.compile wrappers are unwrapped), not yet sharded.
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
                "student is already sharded (FSDP): build the MomentumTeacher from the student before sharding, "
                "then shard both (conmim.parallel.Sharded does this)"
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
        for p in self.module.parameters():  # 1 - m ~ 0.004 is below bf16's resolution: the EMA needs fp32
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        self._validated: tuple | None = None  # the parameter lists' signature last validated

    def momentum(self, step: int) -> float:
        """The scheduled momentum at ``step``."""
        return momentum_schedule(step, self.total_steps, self.base_momentum, self.final_momentum)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) local tensors to average, validated whenever their signature changed."""
        mine = [_local(p) for p in self.module.parameters()]
        theirs = [_local(p) for p in _unwrap(student).parameters()]
        signature = (_signature(mine), _signature(theirs))
        if signature != self._validated:
            if len(theirs) != len(mine):
                raise ValueError(
                    f"student has {len(theirs)} parameters but the teacher has {len(mine)}: "
                    "pass the same architecture the teacher was built from"
                )
            check_tensor_lists(mine, theirs)
            self._validated = signature
        return mine, theirs

    @torch.no_grad()
    def update(self, student: nn.Module, step: int | None = None, momentum=None):
        """One EMA step from ``student`` and the momentum it used: the schedule's at ``step``, or ``momentum`` if
        given (a float, or a 0-d device tensor, e.g. to replay the update in a CUDA graph)."""
        if (step is None) == (momentum is None):
            raise ValueError("update needs exactly one of step (scheduled momentum) or momentum")
        m = self.momentum(step) if momentum is None else momentum
        if momentum is not None:
            check_momentum(momentum)  # the schedule's own values are valid by construction
        mine, theirs = self._pairs(student)
        name = backends.requested_backend(self.backend)
        if isinstance(m, torch.Tensor):
            ema_update_op(mine, theirs, 0.0, m.detach(), name)
        else:
            ema_update_op(mine, theirs, float(m), None, name)
        if self.copy_buffers:
            for tb, sb in zip(self.module.buffers(), _unwrap(student).buffers()):
                tb.copy_(sb)
        return m


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (a view: writing it writes the parameter), else ``p``."""
    return p.to_local() if isinstance(p, DTensor) else p.detach()


def _signature(tensors: list[torch.Tensor]) -> tuple:
    """What decides whether a list of tensors is still the one validated; read on the host, no device sync."""
    return tuple((t.shape, t.dtype, t.device, t.data_ptr(), t.stride()) for t in tensors)
