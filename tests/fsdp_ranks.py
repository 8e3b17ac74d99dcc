"""One rank of the FSDP tests (launched by torchrun from tests/test_fsdp.py), and the pieces the single-process
reference in that file shares with it: the tiny encoder, the data, one optimizer step.

    python -m torch.distributed.run --nproc_per_node W -m tests.fsdp_ranks OUT --steps N [--save_at K ...]
        [--resume] [--die_saving K] [--precision fp32] [--reshard true] [--grad_checkpointing false]

Every optimizer step consumes MICRO micro-batches of BATCH images, rank r taking micro-batches r, r + W, ...
(gradients averaged over all of them), so any W dividing MICRO computes the same steps. Rank 0 writes
OUT/result-w<W>.pt: the losses, gradient norms and momenta of the steps it ran and the full student and teacher state dicts.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from conmim import checkpoint as ckpt
from conmim import parallel
from conmim.loss import FusedPatchContrastLoss
from conmim.models import build_encoder

MICRO, BATCH, CLIP, LR, TOTAL_STEPS = 4, 2, 1.0, 2e-3, 8
# AdamW's eps: 1e-6, not 1e-8, so that parameters whose true gradient is zero (the final norm's bias: the head's
# BatchNorm removes any constant shift) do not turn rounding noise into full-size updates that differ by run
EPS = 1e-6


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return build_encoder("vit_tiny_demo", 64, 32, img_size=32, patch_size=4)


def sharded(precision="bf16", reshard=True, grad_checkpointing=False, model=None, **momentum):
    """(student, teacher) of conmim.parallel.Sharded on the CPU (its process group started if needed)."""
    momentum = {"base_momentum": 0.99, "final_momentum": 1.0, "total_steps": TOTAL_STEPS, **momentum}
    strategy = parallel.Sharded(
        encoder() if model is None else model,
        torch.device("cpu"),
        momentum,
        precision,
        grad_checkpointing,
        reshard,
    )
    return strategy.student, strategy.teacher


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.05, eps=EPS)


def micro_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    xs, xt = torch.randn(2, BATCH, 3, 32, 32, generator=g)
    return xs, xt, torch.rand(BATCH, 64, generator=g) < 0.4


def train_step(student, teacher, opt, step: int, micros, loss_fn) -> tuple[torch.Tensor, float]:
    """Forward/backward over ``micros`` (loss / accum, accum = micro-batches per rank), clip, AdamW step, EMA.
    Returns the sum of the micro-batch losses seen here and the gradient norm before clipping (AdamW and the
    clipping do not see a wrong gradient scale; the norm does)."""
    total = torch.zeros(())
    for m in micros:
        xs, xt, mask = micro_batch(step, m)
        feats = student(xs, mask)
        with torch.no_grad():
            target = teacher(xt)
        loss = loss_fn(feats, target, mask)
        (loss / len(micros)).backward()
        total += loss.detach()
    norm = nn.utils.clip_grad_norm_(student.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    teacher.update(student, step)
    return total, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _die_mid_save(rank: int) -> None:
    """Rank 1 SIGKILLs itself right after writing its shard file, before the checkpoint is complete."""
    writer = torch.distributed.checkpoint.FileSystemWriter
    write_data = writer.write_data

    def write_then_die(self, plan, planner):
        result = write_data(self, plan, planner)
        if rank == 1:
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    writer.write_data = write_then_die


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, required=True, help="run until this optimizer step")
    p.add_argument("--save_at", type=int, nargs="*", default=[])
    p.add_argument("--resume", action="store_true", help="load the newest checkpoint in OUT first")
    p.add_argument("--die_saving", type=int, default=None, help="rank 1 dies while saving at this step")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--reshard", default="true")
    p.add_argument("--grad_checkpointing", default="false")
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher = sharded(a.precision, a.reshard == "true", a.grad_checkpointing == "true")
    opt = optimizer(student)
    parts = {"student": student, "teacher": teacher.module, "optimizer": (student, opt)}
    manager = ckpt.CheckpointManager(a.out, keep_last=100)
    loss_fn = FusedPatchContrastLoss(temperature=0.1)
    step = 0
    if a.resume:
        step = manager.load_latest(parts)["step"]
    losses, norms, momenta = {}, {}, {}
    for k in range(step, a.steps):
        if k == a.die_saving:
            _die_mid_save(rank)
        if k in a.save_at or k == a.die_saving:
            manager.save(parts, {"step": k}, 0, k, False)
        local, norms[k] = train_step(student, teacher, opt, k, range(rank, MICRO, world), loss_fn)
        dist.all_reduce(local)
        losses[k], momenta[k] = float(local) / MICRO, teacher.momentum(k)
    result = {
        "losses": losses,
        "momenta": momenta,
        "grad_norms": norms,
        "student": parallel.full_state_dict(student),
        "teacher": parallel.full_state_dict(teacher.module),
    }
    if rank == 0:
        torch.save(result, a.out / f"result-w{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
