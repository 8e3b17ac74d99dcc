"""Per-rank memory of the training state under FSDP and DDP: student parameters, gradients, AdamW state and the
momentum teacher, for a ConMIM encoder (default vit_large_patch16_224 with the 4096-4096-256 head).

``python -m benchmarks.bench_fsdp_memory [--model NAME] [--worlds 1,2,4,8]`` builds the encoder on the meta
device (shapes and dtypes, no memory), and for each world size launches that many real gloo ranks under torchrun
which run ``conmim.parallel.Sharded`` and one AdamW step on meta gradients, then count the bytes of every rank's
local shards (the padded storage FSDP allocates). DDP's figure is the same count on the unsharded modules (every
rank holds all of it). Derived on the CPU from the modules' shapes: no GPU was used, activations and the
transient all-gathered blocks are not included (the largest gathered unit is reported beside). Writes
benchmarks/results/fsdp-memory-<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("student", "gradients", "optimizer", "teacher")


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.untyped_storage().nbytes()


def _meta_encoder(model: str) -> nn.Module:
    from conmim.models import build_encoder

    with torch.device("meta"):
        return build_encoder(model)


def _state_bytes(student: nn.Module, teacher_params, opt: torch.optim.Optimizer) -> dict:
    """Bytes of each part after one AdamW step on zero (meta) gradients, which creates the optimizer state."""
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # FSDP gives every parameter its own padded storage; DDP's parameters are separate tensors too
    return {
        "student": sum(_nbytes(p) for p in student.parameters()),
        "gradients": sum(_nbytes(p.grad) for p in student.parameters()),
        "optimizer": sum(_nbytes(v) for s in opt.state.values() for v in s.values()),
        "teacher": sum(_nbytes(p) for p in teacher_params),
    }


def ddp_bytes(model: str) -> dict:
    """Every DDP rank: the whole student, its gradients, AdamW's two moments, the fp32 teacher. Not counted:
    DDP's gradient buckets (another copy of the gradients unless gradient_as_bucket_view=True)."""
    student = _meta_encoder(model)
    teacher = copy.deepcopy(student)
    return _state_bytes(student, list(teacher.parameters()), torch.optim.AdamW(student.parameters()))


def _largest_gathered_unit(student: nn.Module) -> int:
    """Bytes of the largest FSDP unit as the forward gathers it: bf16 blocks and root, the fp32 head."""
    head = 4 * sum(p.numel() for p in student.head.parameters())
    block = max(2 * sum(p.numel() for p in b.parameters()) for b in student.backbone.blocks)
    rest = [p for n, p in student.named_parameters() if not n.startswith(("head.", "backbone.blocks."))]
    return max(head, block, 2 * sum(p.numel() for p in rest))


def worker(model: str, out: Path) -> None:
    """One rank under torchrun: shard with conmim.parallel.Sharded, count this rank's bytes, rank 0 writes all."""
    import torch.distributed as dist

    from conmim.parallel import Sharded

    dist.init_process_group("gloo")
    sharded = Sharded(_meta_encoder(model), torch.device("cpu"), {}, precision="bf16")
    student, teacher = sharded.student, sharded.teacher
    mine = _state_bytes(student, list(teacher.parameters()), torch.optim.AdamW(student.parameters()))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"ranks": every, "largest_gathered_unit": _largest_gathered_unit(student)}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_bytes(model: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "benchmarks.bench_fsdp_memory",
               "--worker", str(out), "--model", model]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"{world} ranks failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_fsdp_memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="vit_large_patch16_224")
    p.add_argument("--worlds", default="1,2,4,8", help="comma-separated world sizes")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.worker is not None:
        worker(a.model, a.worker)
        return 0
    ddp = ddp_bytes(a.model)
    ddp_total = sum(ddp.values())
    rows = []
    print(
        f"{a.model}: per-rank bytes (GiB), derived from the modules' shapes on the CPU (meta device), no GPU"
    )
    print(
        f"{'strategy':>8} {'ranks':>5} " + " ".join(f"{k:>9}" for k in PARTS) + f" {'total':>9} {'vs DDP':>7}"
    )
    print(
        f"{'ddp':>8} {'any':>5} " + " ".join(f"{_gib(ddp[k]):>9}" for k in PARTS) + f" {_gib(ddp_total):>9}"
    )
    for world in (int(w) for w in a.worlds.split(",")):
        got = fsdp_bytes(a.model, world)
        worst = max(got["ranks"], key=lambda r: sum(r.values()))  # the rank holding the most
        total = sum(worst.values())
        rows.append(
            {"world": world, "max_rank": worst, "max_rank_total": total, "fraction_of_ddp": total / ddp_total,
             "largest_gathered_unit": got["largest_gathered_unit"], "ranks": got["ranks"]}
        )  # fmt: skip
        print(
            f"{'fsdp':>8} {world:>5} " + " ".join(f"{_gib(worst[k]):>9}" for k in PARTS)
            + f" {_gib(total):>9} {total / ddp_total:>7.3f}"
        )  # fmt: skip
    if not a.no_save:
        path = harness.RESULTS / f"fsdp-memory-{a.model}.json"
        payload = {
            "method": "derived on the CPU: bytes of every parameter, gradient, AdamW state and teacher tensor "
            "(local shards under FSDP, padded storage) after conmim.parallel.Sharded and one AdamW step on the meta "
            "device, on real gloo ranks under torchrun; DDP = the same on the unsharded modules. No GPU; "
            "activations, DDP buckets and FSDP's transient all-gathered unit (largest_gathered_unit, bytes) "
            "are not in the totals",
            "model": a.model,
            "fsdp_precision": "bf16 (sharded state fp32)",
            "commit": harness.commit(),
            "versions": harness.versions(),
            "ddp": {"per_rank": ddp, "total": ddp_total},
            "fsdp": rows,
        }
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
