"""conmim-finetune: the paper's evaluation, fine-tuning a pretrained backbone as a classifier.

    conmim-finetune --init runs/tiny_demo --config cpu_demo --out runs/ft_demo       # CPU, bundled digits
    conmim-finetune --init runs/vit_b --data /imagenet --out runs/vit_b_ft            # official recipe
    conmim-finetune --init vit_b.safetensors --data /imagenet --out runs/ft --baseline true
    torchrun --nproc_per_node 8 -m conmim.finetune --init runs/vit_b --data /imagenet --out runs/ft

The run folder gets config.yaml (the resolved configuration), metrics.jsonl (training loss every log_every
steps, validation top-1/top-5 after every epoch), tb/ when TensorBoard is installed, loss_curve.png, checkpoints
written atomically (a run started again with the same --out resumes exactly where the newest one left it) and
eval_finetune.json, the results in conmim-eval's format with top5, best_top1 and epochs added.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from conmim import config as cfgmod
from conmim.checkpoint import (
    CheckpointError,
    CheckpointManager,
    checkpoints,
    lock_run_folder,
    rng_state,
    set_rng_state,
)
from conmim.finetune.config import ConfigError, FinetuneConfig
from conmim.finetune.data import (
    PAD_LABEL,
    DaliLabelledLoader,
    _Seeded,
    class_subset,
    eval_loader,
    train_loader,
)
from conmim.finetune.recipe import (
    Init,
    build_classifier,
    make_criterion,
    make_mixup,
    make_optimizer,
    make_scheduler,
    make_transforms,
    peak_lr,
    resolve_init,
)
from conmim.metrics import Logger
from conmim.parallel import STRATEGIES, ParallelError, dist_env, init_process_group, pick_device

PROG = "conmim-finetune"
RESULTS = "eval_finetune.json"
# Keys that do not change what a run computes: a run folder may be resumed with other values for these.
MACHINERY = ("out", "device", "num_workers", "eval_batch_size", "log_every", "checkpoint_every", "keep_last",
             "progress", "baseline", "strategy")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ logging
def plot(out: Path) -> Path | None:
    """loss_curve.png: training loss per optimizer step, validation top-1 (right axis) after each epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses, evals = [r for r in rows if "loss" in r], [r for r in rows if "top1" in r]
    if not losses and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="C0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="C0")
    ax.set_title(out.name)
    right = ax.twinx()
    right.plot([r["step"] for r in evals], [100 * r["top1"] for r in evals], "o-", color="C1", label="top-1")
    right.plot([r["step"] for r in evals], [100 * r["top5"] for r in evals], "s--", color="C2", label="top-5")
    right.set_ylabel("validation accuracy (%)", color="C1")
    right.legend(loc="center right", fontsize="small")
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class RunState:
    """What a checkpoint saves besides the weights and the optimizer: the position, the evaluations so far
    (so the best is exact after a resume) and the global torch RNG (drop path draws from it)."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps done
    evals: list = field(default_factory=list)  # {"epoch", "step", "top1", "top5", "val_loss"} per epoch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "evals": self.evals,
            "rng": rng_state(),
        }

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.batch, self.step, self.evals = s["epoch"], s["batch"], s["step"], list(s["evals"])
        set_rng_state(s["rng"])


@dataclass
class Run:
    cfg: FinetuneConfig
    init: Init
    device: torch.device
    rank: int
    world: int
    out: Path
    classes: list
    train_files: list
    loader: object
    sampler: object
    val_loader: object
    net: nn.Module  # the classifier itself (its blocks sharded in place under fsdp)
    parallel: object  # the strategy (conmim.parallel.Replicated or Sharded)
    model: nn.Module  # as called in training: DDP-wrapped under torchrun with ddp
    opt: torch.optim.Optimizer
    sched: object
    mixup: object
    criterion: nn.Module
    autocast: object
    scaler: torch.amp.GradScaler  # enabled with fp16 only
    steps_per_epoch: int
    total_steps: int
    lr: float
    log: Logger | None = None
    ckpt: CheckpointManager | None = None
    progress: object = None
    lock: int | None = None  # the run folder's lock (rank 0), released when the run ends
    postfix: dict = field(default_factory=dict)  # what the progress bar shows after its count


def build_run(
    cfg: FinetuneConfig, rank: int, world: int, device: torch.device, init: Init | None = None
) -> Run:
    """Everything the run trains with, every input checked; writes nothing."""
    from conmim.evaluate import labelled_split

    if cfg.out is None:
        raise ValueError("out is required: the run folder (config, metrics, checkpoints, results)")
    if cfg.data is None:
        raise ValueError("data is required: a folder with train/<class>/ and val/<class>/, or samples:mnist")
    tr, va = labelled_split(cfg.data)
    keep = class_subset(tr.labels, cfg.train_fraction, cfg.seed)
    files, labels = [tr.files[i] for i in keep], [tr.labels[i] for i in keep]
    init = init or resolve_init(cfg, lambda m: print(f"{PROG}: {m}", file=sys.stderr) if rank == 0 else None)
    net = build_classifier(init, len(tr.classes), cfg, cfg.seed).to(device)
    size = int(net.patch_embed.img_size[0])
    t_train, t_val = make_transforms(cfg, size)
    pin = device.type == "cuda"
    if cfg.loader == "dali":
        dev = device.index if device.type == "cuda" else None
        loader = sampler = DaliLabelledLoader(
            files, labels, cfg, size, cfg.batch_size, rank, world, cfg.seed, dev, max(1, cfg.num_workers)
        )
    else:
        loader, sampler = train_loader(
            files, labels, t_train, cfg.batch_size, rank, world, cfg.seed, cfg.num_workers, pin
        )
    val = eval_loader(va.files, va.labels, t_val, cfg.eval_batch_size, rank, world, cfg.num_workers, pin)
    steps_per_epoch = len(sampler) // cfg.batch_size // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(files)} training images give no optimizer step of batch_size {cfg.batch_size} x accum_steps "
            f"{cfg.accum_steps} x {world} rank(s): lower batch_size or raise train_fraction"
        )
    total = steps_per_epoch * cfg.epochs
    lr = peak_lr(cfg, world)
    parallel = STRATEGIES[cfg.strategy](
        net, device, None, precision=cfg.precision, grad_checkpointing=cfg.grad_checkpointing
    )
    opt = make_optimizer(net, cfg, lr)  # after sharding, which replaces the parameters by their shards
    mixup = make_mixup(cfg, len(tr.classes))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return Run(
        cfg=cfg, init=init, device=device, rank=rank, world=world, out=Path(cfg.out).expanduser(),
        classes=tr.classes, train_files=files, loader=loader, sampler=sampler, val_loader=val, net=net,
        parallel=parallel, model=parallel.model, opt=opt, sched=make_scheduler(opt, cfg, total, round(cfg.warmup_epochs * steps_per_epoch)),
        mixup=mixup, criterion=make_criterion(cfg, mixup),
        autocast=torch.autocast(device.type, dtype=low) if low is not None else nullcontext(),
        scaler=parallel.grad_scaler(device.type, enabled=cfg.precision == "fp16"),
        steps_per_epoch=steps_per_epoch, total_steps=total, lr=lr,
    )  # fmt: skip


def _mix_seed(seed: int, micro_batch: int, rank: int) -> int:
    return (seed * 1_000_003 + micro_batch * 7_919 + rank * 104_729 + 1) % (2**63 - 1)


def train_step(run: Run, state: RunState, micro_batches, sums: torch.Tensor) -> None:
    """One optimizer step over ``accum_steps`` micro-batches; the losses are summed into ``sums`` on the
    device (no host read). Mixup draws from a seed of (seed, micro-batch, rank), so it repeats after a resume."""
    cfg = run.cfg
    run.sched.step_update(state.step)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.mixup is not None:
            with _Seeded(_mix_seed(cfg.seed, state.step * cfg.accum_steps + i, run.rank)):
                x, y = run.mixup(x, y)
        with run.parallel.no_sync(i == cfg.accum_steps - 1):
            with run.autocast:
                logits = run.model(x)
            loss = run.criterion(logits.float(), y)
            run.scaler.scale(loss / cfg.accum_steps).backward()
        sums += torch.stack([loss.detach(), torch.ones((), device=run.device)])
        state.batch += 1
    run.scaler.unscale_(run.opt)  # (a no-op unless fp16) so that clipping sees the true gradients
    if cfg.clip_grad > 0:
        run.parallel.grad_norm(cfg.clip_grad)
    run.scaler.step(run.opt)  # with fp16: skipped when a gradient is inf or NaN, and the scale lowered
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    state.step += 1


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Validation top-1, top-5 (fractions) and mean cross-entropy over every validation image (summed over ranks)."""
    run.net.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # top1, top5, loss, images
    for x, y in run.val_loader:
        x, y = x.to(run.device), y.to(run.device)
        with run.autocast:
            logits = run.net(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]  # a padding image (PAD_LABEL) hits nothing
        loss = nn.functional.cross_entropy(logits, y, reduction="sum", ignore_index=PAD_LABEL)
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), loss, (y != PAD_LABEL).sum()]).double()
    if run.world > 1:
        torch.distributed.all_reduce(sums)
    run.net.train()
    top1, top5, loss, n = sums.tolist()
    return {"top1": top1 / n, "top5": top5 / n, "val_loss": loss / n}


def validate(run: Run, state: RunState) -> None:
    """Evaluate, record (metrics.jsonl, the log, the state's history) and show the best so far."""
    ev = evaluate(run) | {"epoch": state.epoch, "step": state.step}
    state.evals.append(ev)
    best = max(e["top1"] for e in state.evals)
    run.log.metrics(ev | {"best_top1": best})
    run.log.msg(
        f"epoch {state.epoch}: top-1 {100 * ev['top1']:.2f}%, top-5 {100 * ev['top5']:.2f}% "
        f"(best top-1 {100 * best:.2f}%)"
    )
    if run.progress is not None:
        run.postfix["top1"] = f"{100 * ev['top1']:.1f}%"
        run.progress.set_postfix(run.postfix)


def _parts(run: Run) -> dict:
    return {"model": run.net, "optimizer": (run.net, run.opt)}


def checkpoint(run: Run, state: RunState) -> None:
    """Every rank: the weights, the optimizer and the run state as one verified checkpoint (conmim.checkpoint)."""
    extra = state.state_dict() | {"scaler": run.scaler.state_dict()}
    run.ckpt.save(_parts(run), extra, state.epoch, state.step, epoch_end=state.batch == 0)


def restore(run: Run, state: RunState) -> None:
    """The newest verified checkpoint of the run folder, if any, into the network, the optimizer and ``state``."""
    saved = run.ckpt.load_latest(_parts(run))
    if saved is not None:
        state.load_state_dict(saved)
        run.scaler.load_state_dict(saved.get("scaler", {}))


def check_compatible(out: Path, cfg: FinetuneConfig) -> None:
    """Refuse a run folder holding checkpoints of another configuration (reads only)."""
    saved = out / "config.yaml"
    if not saved.exists() or not checkpoints(out):
        return
    old = cfgmod.read_file(saved)
    diff = [k for k, v in cfg.to_dict().items() if k not in MACHINERY and old.get(k) != v]
    if diff:
        what = ", ".join(f"{k}: {old.get(k)!r} there vs {getattr(cfg, k)!r} here" for k in diff)
        raise ValueError(
            f"run folder {str(out)!r} holds checkpoints of another fine-tuning ({what}); choose another out"
        )


def results(run: Run, state: RunState) -> dict:
    """conmim-eval's results format (mode, source, data, which, top1) plus top5, best_top1, epochs."""
    last = state.evals[-1] if state.evals else {}
    best = max(state.evals, key=lambda e: e["top1"]) if state.evals else {}
    which = run.cfg.which if Path(run.init.source).is_dir() else None
    return {
        "mode": "finetune", "source": run.init.source, "data": run.cfg.data, "which": which,
        "top1": last.get("top1"), "top5": last.get("top5"), "best_top1": best.get("top1"),
        "best_epoch": best.get("epoch"), "epochs": state.epoch, "train_fraction": run.cfg.train_fraction,
        "train_images": len(run.train_files), "seed": run.cfg.seed,
    }  # fmt: skip


def _loop(run: Run) -> dict:
    cfg, state = run.cfg, RunState()
    torch.manual_seed(cfg.seed + run.rank)  # drop path's draws (a resume restores the saved state instead)
    restore(run, state)
    run.log.msg(
        f"{len(run.train_files)} training images ({cfg.train_fraction:g} of each class), {len(run.classes)} "
        f"classes, {run.steps_per_epoch} steps of {cfg.batch_size} x {cfg.accum_steps} x {run.world} per epoch, "
        f"{run.total_steps} steps, peak lr {run.lr:.3g}, init {run.init.source}, on {run.device}"
    )
    if run.rank == 0 and cfg.progress and state.step < run.total_steps:
        from tqdm import tqdm

        run.progress = tqdm(
            total=run.total_steps, initial=state.step, desc=PROG, unit="step", dynamic_ncols=True
        )
    sums, since = torch.zeros(2, device=run.device), time.perf_counter()
    while state.epoch < cfg.epochs:
        run.sampler.set_epoch(state.epoch, state.batch * cfg.batch_size)
        batches = iter(run.loader)
        while state.batch < run.steps_per_epoch * cfg.accum_steps:
            train_step(run, state, (next(batches) for _ in range(cfg.accum_steps)), sums)
            if run.progress is not None:
                run.progress.update(1)
            if state.step % cfg.log_every == 0 or state.batch == run.steps_per_epoch * cfg.accum_steps:
                loss, n = sums.tolist()
                now = time.perf_counter()
                lr = max(g["lr"] for g in run.opt.param_groups)
                record = {"step": state.step, "epoch": state.epoch, "loss": loss / max(n, 1), "lr": lr,
                          "images_per_s": n * cfg.batch_size * run.world / (now - since)}  # fmt: skip
                run.log.metrics(record)
                if run.progress is not None:
                    run.postfix.update(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                    run.progress.set_postfix(run.postfix)
                sums.zero_()
                since = now
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                checkpoint(run, state)
        del batches
        state.epoch, state.batch = state.epoch + 1, 0
        if state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs:
            validate(run, state)
        checkpoint(run, state)
        since = time.perf_counter()
    return results(run, state)


def _start(cfg: FinetuneConfig, init: Init | None = None) -> Run:
    """Build (validating everything), then, and only then, lock and write to the run folder."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg.device, local_rank)
    init_process_group(device)
    run = build_run(cfg, rank, world, device, init)
    check_compatible(run.out, cfg)
    if rank == 0:
        run.lock = lock_run_folder(run.out)
        cfgmod.dump(cfg, run.out / "config.yaml")
    if world > 1:
        torch.distributed.barrier()
    run.log = Logger(run.out, rank, PROG)
    run.ckpt = CheckpointManager(run.out, cfg.keep_last, 0, run.log.msg)
    return run


def train(cfg: FinetuneConfig, init: Init | None = None) -> dict:
    """Fine-tune (or resume) as configured; returns the results (also written to OUT/eval_finetune.json).
    With ``baseline`` the same recipe then runs from random initialisation in OUT/scratch, and the results gain
    ``top1_random_init``, ``top5_random_init`` and ``best_top1_random_init``. Bad input raises ValueError or
    FileNotFoundError before anything is written."""
    run = _start(cfg, init)
    try:
        summary = _loop(run)
    finally:
        if run.progress is not None:
            run.progress.close()
        run.log.close()
        if run.lock is not None:
            os.close(run.lock)
    if cfg.baseline:
        scratch = train(
            dataclasses.replace(cfg, init="none", out=str(run.out / "scratch"), baseline=False),
            Init(run.init.timm_name, run.init.kwargs, None, "none"),
        )
        summary.update({f"{k}_random_init": scratch[k] for k in ("top1", "top5", "best_top1")})
    if run.rank == 0:
        from conmim._fs import write_atomic

        write_atomic(run.out / RESULTS, json.dumps(summary, indent=1))
        plot(run.out)
    return summary


def _percent(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def parser():
    """conmim-finetune's argparse, generated from :class:`FinetuneConfig`'s fields."""
    doc = __doc__.split("\n\n")
    return cfgmod.parser(FinetuneConfig, PROG, doc[0], "\n\n".join(doc[1:]))


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(sys.argv[1:] if argv is None else argv))
    try:
        cfg = cfgmod.resolve(FinetuneConfig, args.pop("config", None), args)
        res = train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, CheckpointError, ParallelError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist_env()[0] == 0:
        line = (f"fine-tuned top-1 {_percent(res['top1'])}, top-5 {_percent(res['top5'])}, best top-1 "
                f"{_percent(res['best_top1'])} after {res['epochs']} epochs")  # fmt: skip
        if "top1_random_init" in res:
            gain = 100 * (res["top1"] - res["top1_random_init"])
            line += f" (from random initialisation: {_percent(res['top1_random_init'])}, {gain:+.2f} points)"
        print(line)
        print(f"results written to {Path(cfg.out).expanduser() / RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
