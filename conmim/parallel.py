"""Processes, devices and the two parallel strategies, each an object that holds its own state.

- ``Replicated`` (``strategy: ddp``): the whole student, teacher and optimizer state on every rank; under
  torchrun the student is wrapped in DistributedDataParallel (one process trains it as is).
- ``Sharded`` (``strategy: fsdp``): FSDP2 ``fully_shard`` per transformer block, the projection head and the
  root, for the student and for the teacher on the same mesh; the teacher's EMA runs on the local shards.

Both build the one :class:`conmim.teacher.MomentumTeacher` (none for fine-tuning, which trains one network: a
timm classifier) and expose the same small interface to the loop:
``model`` (what to call), ``student`` (the module whose parameters the optimizer holds), ``teacher``,
``grad_scaler`` (its class), ``fused_adamw_with_scaler``, ``no_sync``, ``grad_norm``, ``eval_model`` and
``finish``. Checkpoints are the
same for both (:mod:`conmim.checkpoint`), so a run saved under one resumes under the other at any world size.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from conmim.teacher import MomentumTeacher

DEVICES = ("auto", "cpu", "cuda")
# compute dtype of each ``precision`` (autocast, and FSDP's gathered parameters); gradients reduce in fp32
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ParallelError(RuntimeError):
    """A device or process setup that cannot run; the message says why."""


# ---------------------------------------------------------------------------------------- processes, devices
def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def pick_device(name: str, local_rank: int) -> torch.device:
    """``cuda`` (this process's GPU), ``cpu``, or ``auto``: the GPU when torch sees one."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ParallelError("device cuda was asked for but torch sees no GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(device: torch.device) -> None:
    """The default process group (NCCL on GPUs, gloo on CPUs) from torchrun's environment; without torchrun a
    one-rank group, so the same code runs in one process."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def on_rank0(action, errors: tuple = (OSError,)) -> None:
    """``action()`` on rank 0 alone; an exception of ``errors`` it raises is raised again on every rank as a
    ParallelError with the same message, so no rank waits forever at the next collective."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            action()
        except errors as exc:
            error = (
                str(exc)
                if not isinstance(exc, OSError) or exc.strerror is None
                else f"{exc.strerror}: {exc.filename}"
            )
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ParallelError(error)


def transformer_blocks(net: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a ConMIM encoder (its backbone's) or of a timm ViT/BEiT classifier."""
    return net.backbone.blocks if hasattr(net, "backbone") else net.blocks


def checkpoint_blocks(encoder: nn.Module) -> None:
    """Activation checkpointing per transformer block (non-reentrant ``torch.utils.checkpoint``): each block's
    activations are recomputed in the backward. Names and state dicts do not change. Apply before sharding."""
    for block in transformer_blocks(encoder):
        if isinstance(block.forward, functools.partial):
            raise ValueError("checkpoint_blocks: the encoder's blocks are already checkpointed")
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _teacher(student: nn.Module, momentum: dict | None) -> MomentumTeacher | None:
    return None if momentum is None else MomentumTeacher(student, **momentum)


# ------------------------------------------------------------------------------------------------ strategies
class Replicated:
    """``strategy: ddp``: DDP under torchrun, the student as is in one process.

    Args:
        student: the network trained (a ConMIMEncoder, or a timm classifier when fine-tuning) on its device,
            unsharded.
        device: the training device.
        momentum: MomentumTeacher's keyword arguments (base_momentum, final_momentum, total_steps), or None: no
            teacher (fine-tuning).
        precision: unused here (autocast is the loop's); kept so both strategies take the same arguments.
        grad_checkpointing: recompute each block's activations in the backward.
    """

    def __init__(
        self, student, device, momentum: dict | None, precision="fp32", grad_checkpointing=False, **_
    ):
        if grad_checkpointing:
            checkpoint_blocks(student)
        self.teacher = _teacher(student, momentum)
        self.student = self.model = student
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.ddp = None
        if self.world > 1:
            self.ddp = self.model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None
            )

    grad_scaler = torch.amp.GradScaler
    fused_adamw_with_scaler = True  # the fused AdamW takes the gradient scaler's overflow flag on the device

    def no_sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients on the last micro-batch of an accumulation only."""
        return self.ddp.no_sync() if self.ddp is not None and not last_micro_batch else nullcontext()

    def grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the student's gradients to ``max_norm`` (inf: measure only); returns the total norm."""
        return nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)

    def eval_model(self) -> nn.Module | None:
        """The teacher to evaluate, on rank 0 (None elsewhere)."""
        return self.teacher if not dist.is_initialized() or dist.get_rank() == 0 else None

    @torch.no_grad()
    def finish(self, out: Path, log) -> None:
        """Replicas must end identical: gather a float64 checksum of every rank's student and teacher; rank 0
        writes them to rank_checksums.json and raises if they differ (a difference is a bug)."""
        if self.world == 1:
            return
        sums = []
        teacher = [] if self.teacher is None else list(self.teacher.parameters())
        for p in [*self.student.parameters(), *teacher]:
            q = p.detach().double()
            sums += [q.sum(), (q * q).sum()]
        local = torch.stack(sums)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        if dist.get_rank() == 0:
            (out / "rank_checksums.json").write_text(json.dumps([g.tolist() for g in gathered]))
            if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
                raise ParallelError("ranks ended with different weights (see rank_checksums.json)")
            log(f"all {self.world} ranks hold identical weights")


class Sharded:
    """``strategy: fsdp``: student, teacher and AdamW state sharded over the ranks by FSDP2.

    Every transformer block is one FSDP unit, the projection head another, the root (patch embedding, tokens,
    final norm) the last; student and teacher alike. Parameters are gathered in ``precision``'s dtype and
    gradients reduced in fp32; the head is gathered in fp32 (its BatchNorm keeps fp32 running statistics, which
    ``batch_norm`` does not take beside bf16 weights; under autocast its matmuls still run in bf16). The teacher
    always reshards after its forward (it has no backward, and the EMA writes its shards).

    Args: as :class:`Replicated`, plus ``reshard_after_forward`` (free each student block's gathered parameters
    after its forward and gather them again in the backward: less memory, one more all-gather per block).
    Build the optimizer afterwards: sharding replaces the student's parameters by their shards.
    """

    def __init__(
        self,
        student,
        device,
        momentum: dict | None,
        precision="bf16",
        grad_checkpointing=False,
        reshard_after_forward=True,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if not isinstance(reshard_after_forward, bool):
            raise TypeError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
        init_process_group(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
        self.teacher = _teacher(student, momentum)  # its arguments are checked before anything is sharded
        self._template = _meta_copy(student)  # the unsharded layout, without memory: for eval_model
        if grad_checkpointing:
            checkpoint_blocks(student)
        shard_encoder(student, mesh, precision, reshard_after_forward)
        if self.teacher is not None:
            shard_encoder(self.teacher.module, mesh, precision, reshard_after_forward=True)
        self.student = self.model = student
        self.device = device

    # each rank sees its gradient shards only: the sharded scaler agrees on overflow across ranks
    grad_scaler = ShardedGradScaler
    # its overflow flag has shape [1], which the fused AdamW cannot subtract from its step counters of shape []
    # (torch 2.14): with fp16 the foreach AdamW skips an overflowing step after one host read of that flag
    fused_adamw_with_scaler = False

    @contextmanager
    def no_sync(self, last_micro_batch: bool):
        """FSDP reduce-scatters gradients on the last micro-batch of an accumulation only."""
        self.model.set_requires_gradient_sync(last_micro_batch)
        yield

    def grad_norm(self, max_norm: float) -> torch.Tensor:
        """As :meth:`Replicated.grad_norm`; the norm is over every rank's shards, replicated."""
        norm = nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def eval_model(self) -> nn.Module | None:
        """The teacher gathered whole into a plain encoder on rank 0 (None elsewhere); every rank calls it (the
        gather is collective), then rank 0 alone evaluates."""
        full = full_state_dict(self.teacher.module)
        if dist.get_rank() != 0:
            return None
        plain = copy.deepcopy(self._template)
        plain.load_state_dict(full, assign=True)
        return plain.to(self.device)

    def finish(self, out: Path, log) -> None:
        """Nothing to compare: the ranks hold different shards by design."""


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are meta tensors (no memory, no values)."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


STRATEGIES = {"ddp": Replicated, "fsdp": Sharded}  # config key ``strategy`` -> its class


# ------------------------------------------------------------------------------------------------ FSDP parts
def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Gather parameters in ``precision``'s dtype, reduce gradients in fp32."""
    return MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32)


def shard_encoder(encoder: nn.Module, mesh: DeviceMesh, precision: str, reshard_after_forward: bool) -> None:
    """``fully_shard`` each transformer block, a ConMIM encoder's projection head (always gathered in fp32) and
    the root (a timm classifier's head and norms are in the root)."""
    policy = mixed_precision(precision)
    for block in transformer_blocks(encoder):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if hasattr(encoder, "backbone"):
        fully_shard(
            encoder.head,
            mesh=mesh,
            mp_policy=mixed_precision("fp32"),
            reshard_after_forward=reshard_after_forward,
        )
    fully_shard(encoder, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def full_state_dict(module: nn.Module) -> dict:
    """The whole (unsharded) state dict on CPU, on rank 0 only (other ranks get {}); collective. On a one-rank
    CPU mesh its tensors may share the parameters' storage: clone them to keep a snapshot."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
