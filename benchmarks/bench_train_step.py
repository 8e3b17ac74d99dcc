"""One ConMIM training step (student fwd + bwd, teacher fwd, loss, optimizer, EMA): conmim-train's own
``train_step`` (fused loss, fused AdamW with the on-device skip of a non-finite loss, gradient norm, fused EMA) vs
the same step built from the official-style reference loss, AdamW and the per-parameter EMA loop; images/s and, on
a GPU, the fraction of the measured matmul rate counted as model FLOPs.

ViT-S/16 on the CPU (fp32, small batch), ViT-B/16 bf16 on a GPU.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Variant, table, time_interleaved
from conmim import config, train
from conmim.loss import FusedPatchContrastLoss
from conmim.masking import block_masks
from conmim.metrics import Meter
from conmim.models import build_encoder
from conmim.parallel import Replicated
from conmim.reference import ema_update_loop_, patch_contrast_loss_official

CASES = {
    "cpu": ("vit_small_patch16_224", 8, torch.float32),
    "cuda": ("vit_base_patch16_224", 128, torch.bfloat16),
}


def _forward_flops(model: torch.nn.Module, tokens: int) -> float:
    """2 x parameters x tokens for the linear layers + attention's two matmuls (per image)."""
    linear = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)
    bb = model.backbone
    attn = 2 * 2 * tokens * tokens * bb.embed_dim * len(bb.blocks)
    return 2 * linear * tokens + attn


def step_variants(device: torch.device) -> tuple[list[Variant], dict]:
    """The reference and fused step variants for this device, and the case (model, batch, dtype, model FLOPs)."""
    name, batch, dtype = CASES[device.type]
    torch.manual_seed(0)
    student = build_encoder(name).to(device)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    over = {"data": "unused", "model": name, "precision": precision, "warmup_epochs": 0}
    cfg = config.resolve(config.TrainConfig, None, over)
    parallel = Replicated(student, device, {"total_steps": 1000})  # what conmim-train builds
    teacher = parallel.teacher
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98))
    x = torch.randn(batch, 3, 224, 224, device=device)
    mask = block_masks(batch, (14, 14), generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())

    def reference_step(_):
        with autocast:
            feats = student(x, mask)
            with torch.no_grad():
                target = teacher(x)
        patch_contrast_loss_official(feats.float(), target.float(), mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update_loop_(teacher_params, student_params, 0.996)

    run = train.Run(
        cfg=cfg, device=device, rank=0, world=1, out=None, loader=None, parallel=parallel,
        opt=torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True),
        scaler=torch.amp.GradScaler(device.type, enabled=False), loss_fn=FusedPatchContrastLoss(),
        autocast=autocast, steps_per_epoch=1000, total_steps=1000, warmup=0, checkpoints=None,
    )  # fmt: skip
    state, meter = train.RunState(bad_streak=torch.zeros((), device=device)), Meter(device)

    def trainer_step(_):
        train.train_step(run, state, [(x, x, mask)], meter)
        state.step %= run.total_steps

    variants = [
        Variant("reference step (official loss, EMA loop)", reference_step),
        Variant("fused step (fused loss, fused EMA)", trainer_step),
    ]
    flops = 3 * _forward_flops(student, 197) + _forward_flops(student, 197)  # student fwd + bwd, teacher fwd
    return variants, {"model": name, "batch": batch, "dtype": dtype, "flops": flops}


def run(suite: str, device: torch.device, ceil: dict, rounds: int) -> list[dict]:
    variants, case = step_variants(device)
    name, batch, dtype, flops = case["model"], case["batch"], case["dtype"], case["flops"]
    timings = time_interleaved(variants, device, rounds=max(3, rounds // 2), warmup=1, budget_s=60)
    records = []
    for v in variants:
        tm = timings[v.name]
        ips = batch / tm.median if tm.median else None
        records.append({
            "op": "train_step", "model": name, "batch": batch, "dtype": str(dtype), "variant": v.name,
            "median_s": tm.median, "images_per_s": ips, "speedup_vs_reference":
                sorted(tm.ratios)[len(tm.ratios) // 2] if tm.ratios else None,
            "matmul_fraction": (ips * flops / ceil["matmul_flops_per_s"]) if ips else None, "error": tm.error,
        })  # fmt: skip
    return records


def render(records: list[dict]) -> str:
    rows = [
        [
            r["model"],
            str(r["batch"]),
            r["variant"],
            f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-",
            f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-",
            f"{100 * r['matmul_fraction']:.1f}%" if r["matmul_fraction"] else "-",
        ]
        for r in records
    ]
    return table(rows, ["model", "batch", "variant", "images/s", "vs reference", "of matmul rate"])
