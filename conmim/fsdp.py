"""FSDP2 for ConMIM: a sharded student, a teacher sharded on the same mesh and updated by the fused EMA on its
local shards, and DCP checkpoints that resume at any world size.

The pieces a training loop needs, in the order it calls them::

    mesh = fsdp.device_mesh(device)                       # after init_process_group (or alone: one rank)
    student, teacher = fsdp.prepare(student, mesh, fsdp.FSDPOptions(precision="bf16"),
                                    base_momentum, final_momentum, total_steps)
    opt = torch.optim.AdamW(param_groups(student, wd), ...)   # after prepare: it holds the sharded parameters
    run = fsdp.load_latest(out, student, teacher, opt, log)   # resume at any world size: the saved run state
    ...  loss.backward(); clip_grad_norm_; opt.step(); momentum = teacher.update(student, step)
    fsdp.save(out / "ckpt-....dcp", student, teacher, opt, run)   # every rank calls it

Sharding: every transformer block is one FSDP unit, the projection head another, the root (patch embedding,
tokens, final norm) the last; student and teacher alike. A ``MixedPrecisionPolicy`` gathers parameters in the
compute dtype and reduces gradients in fp32; the head is always gathered in fp32 (its BatchNorm keeps fp32 running
statistics, which ``batch_norm`` does not take beside bf16 weights; under autocast its matmuls still run in bf16).
"""

from __future__ import annotations

import copy
import functools
import io
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from conmim import backends
from conmim.reference import momentum_schedule
from conmim.teacher import ema_update_

# compute dtype of the gathered parameters per ``precision``; gradients are always reduced in fp32
PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DCP_GLOB = "ckpt-*.dcp"  # a complete checkpoint; one being written is a *.dcp.tmp folder
_RUN_KEY = "run"  # the run state (epoch, step, RNG, ...), torch.save bytes in a uint8 tensor


@dataclass(frozen=True)
class FSDPOptions:
    """How ``prepare`` shards.

    precision: dtype the parameters are gathered in for compute, "bf16" | "fp16" | "fp32" (the sharded
        parameters, the optimizer state and the teacher stay fp32; gradients are reduced in fp32).
    reshard_after_forward: free each student block's gathered parameters after its forward and gather them again
        in the backward (less memory, one more all-gather per block). The teacher always reshards: it has no
        backward, and the EMA writes its shards.
    grad_checkpointing: recompute each student block's activations in the backward instead of keeping them.
    """

    precision: str = "bf16"
    reshard_after_forward: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.precision not in PARAM_DTYPES:
            raise ValueError(f"precision must be one of {tuple(PARAM_DTYPES)}, got {self.precision!r}")
        for name in ("reshard_after_forward", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")


def device_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over every rank of the default process group, on ``device``'s type (NCCL on GPUs,
    gloo on CPUs is the caller's ``init_process_group``). Without a process group (a run without torchrun) it
    starts a one-rank group first, so the same code runs on one process."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Gather parameters in ``precision``'s dtype, reduce gradients in fp32."""
    return MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[precision], reduce_dtype=torch.float32)


def checkpoint_blocks(encoder: nn.Module) -> None:
    """Activation checkpointing per transformer block (``torch.utils.checkpoint``, non-reentrant): each block's
    activations are recomputed in the backward. Parameter names and state dicts do not change. Works sharded or
    not (apply it before ``fully_shard``, as ``prepare`` does)."""
    for block in encoder.backbone.blocks:
        if isinstance(block.forward, functools.partial):
            raise ValueError("checkpoint_blocks: the encoder's blocks are already checkpointed")
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard_encoder(encoder: nn.Module, mesh: DeviceMesh, precision: str, reshard_after_forward: bool) -> None:
    """``fully_shard`` each transformer block, the projection head (always gathered in fp32) and the root."""
    policy = mixed_precision(precision)
    for block in encoder.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(
        encoder.head,
        mesh=mesh,
        mp_policy=mixed_precision("fp32"),
        reshard_after_forward=reshard_after_forward,
    )
    fully_shard(encoder, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


class ShardedTeacher(nn.Module):
    """The momentum teacher of a sharded student: a copy sharded on the same mesh (``module``), updated on the
    local shards.

    ``update`` runs one fused ``ema_update_`` per rank over the local shards of every parameter (DTensor
    ``to_local()``: no communication), with ``MomentumTeacher``'s cosine momentum schedule. Gradients are off; the
    module stays in train mode (ConMIM's teacher uses batch statistics); buffers are not averaged. Build it with
    ``prepare``.
    """

    def __init__(
        self,
        module: nn.Module,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        total_steps: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        momentum_schedule(0, total_steps, base_momentum, final_momentum)  # validates the schedule's arguments
        backends.requested_backend(backend)
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.total_steps = int(total_steps)
        self.backend = backend
        self.module = module
        self.module.requires_grad_(False)
        self.module.train()

    def momentum(self, step: int) -> float:
        """The scheduled momentum at ``step``."""
        return momentum_schedule(step, self.total_steps, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """One EMA step from the sharded ``student`` at the schedule's ``step``; returns the momentum used."""
        mine, theirs = list(self.module.parameters()), list(student.parameters())
        if len(mine) != len(theirs):
            raise ValueError(
                f"student has {len(theirs)} parameters but the teacher has {len(mine)}: "
                "pass the student the teacher was prepared with"
            )
        m = self.momentum(step)
        ema_update_([_local(p) for p in mine], [_local(p) for p in theirs], m, backend=self.backend)
        return m

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def train(self, mode: bool = True) -> ShardedTeacher:
        """Stays in train mode whatever is asked (see the class note)."""
        return super().train(True)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (a view: writing it writes the parameter)."""
    return p.to_local() if hasattr(p, "to_local") else p


def prepare(
    student: nn.Module,
    mesh: DeviceMesh,
    options: FSDPOptions = FSDPOptions(),
    base_momentum: float = 0.996,
    final_momentum: float = 1.0,
    total_steps: int = 1,
    ema_backend: str = "auto",
) -> tuple[nn.Module, ShardedTeacher]:
    """Copy ``student`` (a ConMIMEncoder, unsharded, on its device) into the teacher, then shard both on
    ``mesh``. Returns (the student, sharded in place, and the teacher). Build the optimizer afterwards."""
    if not isinstance(options, FSDPOptions):
        raise TypeError(f"options must be an FSDPOptions, got {type(options).__name__}")
    # the teacher first: its arguments are checked before anything is sharded
    teacher = ShardedTeacher(copy.deepcopy(student), base_momentum, final_momentum, total_steps, ema_backend)
    if options.grad_checkpointing:
        checkpoint_blocks(student)
    shard_encoder(student, mesh, options.precision, options.reshard_after_forward)
    shard_encoder(teacher.module, mesh, options.precision, reshard_after_forward=True)
    return student, teacher


def full_state_dict(module: nn.Module) -> dict:
    """The whole (unsharded) state dict on CPU, on rank 0 only (other ranks get {}); collective. On a one-rank
    CPU mesh its tensors may share the parameters' storage: clone them to keep a snapshot."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ------------------------------------------------------------------------------------------------- checkpoints
def checkpoints(out: Path) -> list[Path]:
    """DCP checkpoint folders in ``out`` (with their metadata, written last), newest (by name) first."""
    done = (p for p in Path(out).glob(DCP_GLOB) if (p / ".metadata").is_file())
    return sorted(done, key=lambda p: p.name, reverse=True)


def _sharded_state(student: nn.Module, teacher: ShardedTeacher, optimizer) -> dict:
    student_sd, optim_sd = get_state_dict(student, optimizer)
    return {"student": student_sd, "teacher": get_model_state_dict(teacher.module), "optimizer": optim_sd}


def _encode(run: dict) -> torch.Tensor:
    """``run`` as bytes in a uint8 tensor, after checking that ``_decode`` will read it back."""
    if not isinstance(run, dict):
        raise TypeError(f"run must be a dict, got {type(run).__name__}")
    try:
        buf = io.BytesIO()
        torch.save(run, buf)
        blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        _decode(blob)
    except Exception as exc:
        raise TypeError(
            "run must hold only what torch.load(weights_only=True) reads back (tensors, numbers, strings, "
            f"None, and lists, tuples and dicts of them): {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    return blob


def _decode(blob: torch.Tensor) -> dict:
    # weights_only: nothing in a checkpoint can run code (DCP's own objects would be unpickled freely)
    return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, student: nn.Module, teacher: ShardedTeacher, optimizer, run: dict) -> Path:
    """Write a sharded checkpoint to the folder ``path`` (``ckpt-<...>.dcp``), atomically; every rank calls it.

    Each rank writes its shards of the student, the teacher and the optimizer state into ``path`` + ".tmp";
    when all are written rank 0 renames the folder into place, so a kill at any moment leaves either the new
    checkpoint complete or no folder of that name (the previous checkpoints untouched). ``run`` is rank 0's run
    state (epoch, step, RNG, scaler ...: anything ``torch.load(weights_only=True)`` reads back). Leftovers of
    interrupted saves (``*.dcp.tmp``) are removed first. A complete checkpoint of the same name is replaced (a
    kill between moving it aside and renaming the new one loses that one, never another)."""
    path = Path(path)
    if path.suffix != ".dcp" or not path.name.startswith("ckpt-"):
        raise ValueError(f"path must name a folder ckpt-<...>.dcp, got {str(path)!r}")
    tmp = path.with_name(path.name + ".tmp")
    blob = _encode(run)  # on every rank: a bad run state fails them all here, before any collective
    rank = dist.get_rank()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(DCP_GLOB + ".tmp"):
            shutil.rmtree(stale)
    dist.barrier()
    state = _sharded_state(student, teacher, optimizer)
    if rank == 0:
        state[_RUN_KEY] = blob
    # replicated tensors (BatchNorm statistics, which every rank keeps for itself) are saved from rank 0, as the
    # single-file checkpoints do; dcp.save returns on every rank once rank 0 has written the metadata
    dcp.save(state, checkpoint_id=tmp, planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    if rank == 0:
        old = path.with_name(path.name + ".old.tmp")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def _run_size(path: Path) -> torch.Size:
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    if _RUN_KEY not in meta.state_dict_metadata:
        raise ValueError(f"{str(path)!r} is not a conmim FSDP checkpoint (no run state)")
    return meta.state_dict_metadata[_RUN_KEY].size


def load(path, student: nn.Module, teacher: ShardedTeacher, optimizer) -> dict:
    """Load a checkpoint written by ``save`` (at any world size) into the sharded modules and the optimizer;
    returns the run state given to ``save``. Every rank calls it."""
    path = Path(path)
    state = _sharded_state(student, teacher, optimizer)
    state[_RUN_KEY] = torch.empty(_run_size(path), dtype=torch.uint8)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(student, optimizer, model_state_dict=state["student"], optim_state_dict=state["optimizer"])
    set_model_state_dict(teacher.module, state["teacher"])
    return _decode(state[_RUN_KEY])


def load_latest(out, student: nn.Module, teacher: ShardedTeacher, optimizer, log) -> dict | None:
    """``load`` the newest checkpoint in ``out`` that loads; returns its run state, or None when none does. One
    that does not load is reported through ``log`` and the previous one is tried (every rank reaches the same
    verdict: DCP shares one rank's failure with all)."""
    return _newest(out, lambda path: load(path, student, teacher, optimizer), "resuming from", log)


def _newest(out, read, verb: str, log) -> dict | None:
    for path in checkpoints(Path(out)):
        try:
            state = read(path)
        except Exception as exc:
            log(
                f"checkpoint {path.name} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); trying the previous one"
            )
            continue
        log(f"{verb} {path.name} (step {state.get('step')})")
        return state
    return None


def read_state_dict(path) -> dict:
    """A checkpoint as one process's plain dict, without a process group: ``{"student": {...}, "teacher":
    {...}, **run_state}`` (full CPU tensors under the encoder's own names; the optimizer state is not read),
    the layout of the single-file checkpoints, for export and evaluation."""
    path = Path(path)
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    flat = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.state_dict_metadata.items()
        if key.startswith(("student.", "teacher."))
    }
    flat[_RUN_KEY] = torch.empty(_run_size(path), dtype=torch.uint8)
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    out = _decode(flat.pop(_RUN_KEY))
    for which in ("student", "teacher"):
        out[which] = {k[len(which) + 1 :]: v for k, v in flat.items() if k.startswith(which + ".")}
    return out


def load_latest_state_dict(out, log) -> dict | None:
    """``read_state_dict`` of the newest checkpoint in ``out`` that reads (one that does not is reported through
    ``log`` and the previous one is tried); None when none does."""
    return _newest(out, read_state_dict, "reading", log)
