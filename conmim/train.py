"""conmim-train: the ConMIM pretraining driver.

Thin by design: the loss (conmim.loss), the teacher (conmim.teacher), masks and views (conmim.data) and the
network (conmim.models) come from the package; this file wires them into a loop with a schedule, mixed
precision, checkpoints that survive a kill, logging, an optional k-NN monitor, and torchrun with DDP or FSDP.

    conmim-train --config tiny_demo                      # CPU demo on the bundled digits
    conmim-train --config vit_b --data /imagenet/train --out runs/vit_b
    torchrun --nproc_per_node 8 -m conmim.train --config vit_b --data ... --out ...
    torchrun --nproc_per_node 8 -m conmim.train --config vit_l --strategy fsdp --data ... --out ...
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from conmim import config as cfgmod
from conmim import fsdp
from conmim.config import Config
from conmim.data import MaskConfig, ViewConfig, build_loader, samples, write_bad_files
from conmim.evaluate import knn_monitor, labelled_split
from conmim.loss import FusedPatchContrastLoss
from conmim.models import build_encoder, no_weight_decay
from conmim.teacher import MomentumTeacher

CKPT_GLOB = "ckpt-e*-s*.pt"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why."""


# ------------------------------------------------------------------------------------------------ environment
def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for but torch sees no GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_data(spec: str) -> Path:
    """An image folder, or samples:photos / samples:mnist (built once under ``samples.default_dest()``)."""
    if spec.startswith("samples:"):
        which = spec.split(":", 1)[1]
        if which not in ("photos", "mnist"):
            raise TrainingError(f"data {spec!r}: bundled sets are samples:photos and samples:mnist")
        built = samples.build(samples.default_dest(), photos=which == "photos", mnist=which == "mnist")
        return built["photos"] if which == "photos" else built["mnist_train"]
    return Path(spec).expanduser()


# ---------------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then a cosine from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * step / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------- checkpoints
def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, newest first (a write in progress is a .tmp file and never matches)."""
    return sorted(out.glob(CKPT_GLOB), key=lambda p: p.name, reverse=True)


def checkpoint_name(epoch: int, step: int) -> str:
    """A checkpoint's name without its suffix (.pt: one file; .dcp: an FSDP folder)."""
    return f"ckpt-e{epoch:04d}-s{step:08d}"


def write_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` atomically: temp file, fsync, rename."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def prune(out: Path, found: list[Path], keep_last: int, keep_every: int) -> None:
    """Remove the checkpoints in ``found`` (newest first) but the newest ``keep_last`` and every one that ends
    an epoch divisible by ``keep_every``; a checkpoint may be a file or (FSDP) a folder."""
    ends = _epoch_ends(out)
    for old in found[keep_last:]:
        epoch_of = int(old.stem.split("-")[1][1:])  # ckpt-e<epoch>-s<step>
        if not (old.name in ends and keep_every > 0 and epoch_of % keep_every == 0):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _epoch_ends(out: Path) -> set[str]:
    f = out / "epoch_ends.json"
    return set(json.loads(f.read_text())) if f.exists() else set()


def _mark_epoch_end(out: Path, path: Path) -> None:
    ends = _epoch_ends(out) | {path.name}
    tmp = out / "epoch_ends.json.tmp"
    tmp.write_text(json.dumps(sorted(ends)))
    os.replace(tmp, out / "epoch_ends.json")


def load_latest(out: Path, log, action: str = "resuming from") -> dict | None:
    """The newest checkpoint that loads (``weights_only=True``: nothing in the file can run code); a file that
    fails to load is reported and the previous one is tried. ``log`` gets "<action> <name> (<progress>)"."""
    for path in checkpoints(out):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "student" not in state:
                raise ValueError("not a conmim checkpoint")
            log(f"{action} {path.name} ({progress_text(state)})")
            return state
        except Exception as exc:
            log(
                f"checkpoint {path.name} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); trying the previous one"
            )
    return None


def progress_text(state: dict) -> str:
    """A checkpoint's progress in words: "6 epochs done, step 372" or "5 epochs and 62 batches done, step 372"."""
    epochs, batch = state["epoch"], state["batch"]
    batches = f" and {batch} batch{'es' if batch != 1 else ''}" if batch else ""
    return f"{epochs} epoch{'s' if epochs != 1 else ''}{batches} done, step {state['step']}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------- the run
class Logger:
    """JSON lines (rank 0), TensorBoard when installed, and plain messages on stderr."""

    def __init__(self, out: Path, rank: int):
        self.rank = rank
        self.file = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (kept for the run)
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:
                self.tb = None

    def msg(self, text: str) -> None:
        if self.rank == 0:
            print(f"conmim-train: {text}", file=sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def loss_plot(out: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl: the loss, and the teacher's k-NN top-1 (right axis) beside its
    random-initialisation baseline when the run has ``eval_every``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in rows if "loss" in r]
    if not losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="C0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ConMIM loss", color="C0")
    ax.set_title(out.name)
    knn = [r for r in rows if "knn_top1" in r]
    base = [r["knn_top1_random_init"] for r in rows if "knn_top1_random_init" in r]
    if knn or base:
        right = ax.twinx()
        right.plot(
            [r["step"] for r in knn], [100 * r["knn_top1"] for r in knn], "o-", color="C1", label="teacher"
        )
        if base:
            right.axhline(100 * base[-1], color="C1", linestyle="--", linewidth=1, label="random init")
        right.set_ylabel("teacher k-NN top-1 (%)", color="C1")
        right.legend(loc="center right", fontsize="small")
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_compatible(out: Path, cfg: Config) -> None:
    """Refuse an output folder that holds another run's configuration (a different network), or only checkpoints
    of the other strategy (which this one would not resume from). Reads only."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    old = cfgmod.read_file(saved)
    diff = [k for k, v in cfg.arch().items() if old.get(k) != v]
    found = {name: kind.checkpoints(out) for name, kind in STRATEGIES.items()}
    if diff and any(found.values()):
        what = ", ".join(f"{k}: {old.get(k)!r} there vs {getattr(cfg, k)!r} here" for k in diff)
        raise TrainingError(
            f"output folder {str(out)!r} holds checkpoints of another run ({what}); choose another --out"
        )
    other = next((name for name, ckpts in found.items() if ckpts and name != cfg.strategy), None)
    if other is not None and not found[cfg.strategy]:
        raise TrainingError(
            f"output folder {str(out)!r} holds checkpoints of strategy {other} ({found[other][0].name}), "
            f"not {cfg.strategy}: resume with --strategy {other} or choose another --out"
        )


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves and restores besides the weights (with the RNG states).

    ``bad_streak`` (optimizer steps in a row with a non-finite loss) lives on the device, so the step never reads
    it; it is read at log and checkpoint steps only."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps done
    bad_streak: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    knn_random_init: float | None = None  # the teacher k-NN before the first step (eval_every): the baseline

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "bad_streak": int(self.bad_streak),
            "knn_random_init": self.knn_random_init,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.bad_streak = torch.full((), float(state["bad_streak"]), device=self.bad_streak.device)
        self.knn_random_init = state.get("knn_random_init")  # absent from older checkpoints
        set_rng_state(state["rng"])


class Meter:
    """What the log reports, gathered between log steps: losses summed on the device (no host read per step),
    images and data-loading wait counted on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.sums = torch.zeros(2, device=self.device)  # finite losses' sum, their count
        self.losses, self.images, self.wait, self.since = 0, 0, 0.0, now

    def add(self, loss: torch.Tensor, finite: torch.Tensor, images: int) -> None:
        self.sums += torch.stack([torch.where(finite, loss, 0.0), finite.float()]).to(self.sums.dtype)
        self.losses += 1
        self.images += images


@dataclass
class Run:
    """Everything one run trains with, built once by :func:`build_run`."""

    cfg: Config
    device: torch.device
    rank: int
    world: int
    out: Path
    loader: object  # conmim.data.TwoViewLoader
    student: nn.Module
    model: nn.Module  # the student as called: wrapped by the parallel strategy, maybe compiled
    parallel: Replicated | Sharded
    teacher: MomentumTeacher | fsdp.ShardedTeacher
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # a ShardedGradScaler under FSDP
    loss_fn: nn.Module
    autocast: object
    steps_per_epoch: int
    total_steps: int
    warmup: int
    log: Logger | None = None
    progress: object = None
    postfix: dict = field(default_factory=dict)  # what the progress bar shows after the count


# ------------------------------------------------------------------------------------------ parallel strategies
# What differs between strategies, behind one small interface; the step, the log and the checkpoint schedule
# are the same functions for both.
class Replicated:
    """``strategy: ddp``: the whole student, teacher and optimizer state on every rank, gradients all-reduced by
    DDP under torchrun (one process trains the student as is); single-file checkpoints written by rank 0."""

    def __init__(self, student: nn.Module, cfg: Config, device: torch.device, world: int, total_steps: int):
        if cfg.grad_checkpointing:
            fsdp.checkpoint_blocks(student)
        self.teacher = MomentumTeacher(student, cfg.base_momentum, cfg.final_momentum, max(1, total_steps))
        self.ddp = None
        self.model = student
        if world > 1:
            self.ddp = self.model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None
            )

    @staticmethod
    def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=enabled)

    @staticmethod
    def fused_adamw(scaled: bool) -> bool:
        """Always: the fused AdamW takes the GradScaler's overflow flag on the device."""
        return True

    def no_sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients on the last micro-batch of an accumulation only."""
        return self.ddp.no_sync() if self.ddp is not None and not last_micro_batch else nullcontext()

    @staticmethod
    def checkpoints(out: Path) -> list[Path]:
        return checkpoints(out)

    @staticmethod
    def save(run: Run, blob: dict, stem: Path) -> Path:
        """Rank 0 adds the weights and the optimizer state to ``blob`` and writes ``stem``.pt."""
        path = stem.with_name(stem.name + ".pt")
        if run.rank == 0:
            blob.update(
                student=run.student.state_dict(),
                teacher=run.teacher.module.state_dict(),
                optimizer=run.opt.state_dict(),
            )
            write_checkpoint(path, blob)
        return path

    @staticmethod
    def load(run: Run) -> dict | None:
        """The newest loadable checkpoint into the student, teacher and optimizer; returns it (None: none)."""
        saved = load_latest(run.out, run.log.msg)
        if saved is not None:
            run.student.load_state_dict(saved["student"])
            run.teacher.module.load_state_dict(saved["teacher"])
            run.opt.load_state_dict(saved["optimizer"])
        return saved

    @staticmethod
    def eval_model(run: Run) -> nn.Module | None:
        """The teacher to evaluate, on rank 0 (None elsewhere)."""
        return run.teacher if run.rank == 0 else None

    @staticmethod
    def finish(run: Run) -> None:
        """Replicas must end identical: compare them (several ranks)."""
        if run.world > 1:
            check_ranks_in_sync(run.student, run.teacher, run.out, run.rank, run.world, run.log)


class Sharded:
    """``strategy: fsdp`` (:mod:`conmim.fsdp`): student, teacher and AdamW state sharded over the ranks by FSDP2;
    every rank writes its shards of each checkpoint (a ``.dcp`` folder), which loads at any world size."""

    def __init__(self, student: nn.Module, cfg: Config, device: torch.device, world: int, total_steps: int):
        options = fsdp.FSDPOptions(cfg.precision, cfg.reshard_after_forward, cfg.grad_checkpointing)
        mesh = fsdp.device_mesh(device)
        schedule = (cfg.base_momentum, cfg.final_momentum, max(1, total_steps))
        self.model, self.teacher = fsdp.prepare(student, mesh, options, *schedule)

    @staticmethod
    def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
        """Each rank sees its gradient shards only: the sharded scaler agrees on overflow across ranks."""
        return ShardedGradScaler(device.type, enabled=enabled)

    @staticmethod
    def fused_adamw(scaled: bool) -> bool:
        """Not with the sharded gradient scaler (fp16): its overflow flag has shape [1], which the fused AdamW
        cannot subtract from its step counters of shape [] (torch 2.14); the foreach AdamW then skips an
        overflowing step after one host read of that flag."""
        return not scaled

    @contextmanager
    def no_sync(self, last_micro_batch: bool):
        """FSDP reduce-scatters gradients on the last micro-batch of an accumulation only."""
        self.model.set_requires_gradient_sync(last_micro_batch)
        yield

    @staticmethod
    def checkpoints(out: Path) -> list[Path]:
        return fsdp.checkpoints(out)

    @staticmethod
    def save(run: Run, blob: dict, stem: Path) -> Path:
        """Every rank writes its shards to ``stem``.dcp, with ``blob`` (rank 0's) as the run state."""
        return fsdp.save(stem.with_name(stem.name + ".dcp"), run.student, run.teacher, run.opt, blob)

    @staticmethod
    def load(run: Run) -> dict | None:
        """The newest loadable checkpoint, resharded to this world size (every rank); returns its run state."""
        return fsdp.load_latest(run.out, run.student, run.teacher, run.opt, run.log.msg)

    @staticmethod
    def eval_model(run: Run) -> nn.Module | None:
        """The teacher gathered whole into a plain encoder on rank 0 (None elsewhere); every rank calls it (the
        gather is collective), then rank 0 alone evaluates."""
        full = fsdp.full_state_dict(run.teacher.module)
        if run.rank != 0:
            return None
        cfg = run.cfg
        with torch.device("meta"):  # no initialisation: no time spent, no random numbers drawn
            plain = build_encoder(
                cfg.model, cfg.head_hidden, cfg.head_out, img_size=cfg.image_size, patch_size=cfg.patch_size
            )
        plain.load_state_dict(full, assign=True)
        return plain.to(run.device)

    @staticmethod
    def finish(run: Run) -> None:
        """Nothing to compare: the ranks hold different shards by design."""


STRATEGIES = {"ddp": Replicated, "fsdp": Sharded}  # config key strategy -> its class


def wrap_model(student: nn.Module, cfg: Config, device: torch.device, world: int, total_steps: int):
    """The parallel strategy (``cfg.strategy``), chosen here alone: ``Replicated`` (DDP) or ``Sharded`` (FSDP),
    which also builds the teacher; then torch.compile when asked. Returns (the strategy, the module to call).
    Build the optimizer afterwards: FSDP replaces the student's parameters by their shards."""
    parallel = STRATEGIES[cfg.strategy](student, cfg, device, world, total_steps)
    return parallel, torch.compile(parallel.model) if cfg.compile else parallel.model


def build_run(cfg: Config, rank: int, world: int, device: torch.device, out: Path) -> Run:
    """Validate the data, the model and the run folder, and build the run; writes nothing."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data_root = resolve_data(cfg.data)
    views = ViewConfig(image_size=cfg.image_size, perturb=cfg.perturb, scale=(cfg.crop_scale_min, 1.0))
    masks = MaskConfig(kind=cfg.mask, patch_size=cfg.patch_size, ratio=cfg.mask_ratio, cell=cfg.mask_cell)
    loader = build_loader(
        data_root,
        cfg.batch_size,
        views=views,
        masks=masks,
        loader=cfg.loader,
        device=device,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        drop_last=True,
        run_dir=None,  # nothing is written before everything is validated (see _start)
        verbose=False,  # the excluded files are logged by _start
    )
    batches = loader.batches_per_epoch()
    if batches < cfg.accum_steps:
        raise TrainingError(
            f"{len(loader.folder)} usable images give {batches} full batches of {cfg.batch_size} per rank, "
            f"fewer than accum_steps = {cfg.accum_steps}"
        )
    check_compatible(out, cfg)
    if cfg.eval_every:
        labelled_split(cfg.eval_data)  # the k-NN monitor's folder, checked before anything is written
    steps_per_epoch = batches // cfg.accum_steps
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    student = build_encoder(
        cfg.model, cfg.head_hidden, cfg.head_out, img_size=cfg.image_size, patch_size=cfg.patch_size
    ).to(device)
    parallel, model = wrap_model(student, cfg, device, world, total_steps)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    # fused: skips an update on the device when told to (found_inf), with no host read
    opt = torch.optim.AdamW(
        param_groups(student, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=parallel.fused_adamw(scaled=low is torch.float16),
    )
    return Run(
        cfg=cfg,
        device=device,
        rank=rank,
        world=world,
        out=out,
        loader=loader,
        student=student,
        model=model,
        parallel=parallel,
        teacher=parallel.teacher,
        opt=opt,
        scaler=parallel.grad_scaler(device, enabled=low is torch.float16),
        loss_fn=FusedPatchContrastLoss(temperature=cfg.temperature),
        autocast=torch.autocast(device.type, dtype=low) if low is not None else nullcontext(),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=int(cfg.warmup_epochs * steps_per_epoch),
    )


def train_step(run: Run, state: RunState, micro_batches, meter: Meter) -> None:
    """One optimizer step over ``accum_steps`` micro-batches: forward, backward, optimizer, EMA. Reads nothing
    back from the device: a non-finite loss marks the step bad on the device, and the optimizer then skips it
    there (the fused AdamW's ``found_inf``; with fp16 the gradient scaler, which skips on inf/NaN gradients)."""
    cfg = run.cfg
    lr = lr_at(state.step, run.total_steps, run.warmup, cfg.lr, cfg.min_lr)
    for g in run.opt.param_groups:
        g["lr"] = lr
    bad = torch.zeros((), device=run.device)
    for i, (xs, xt, mask) in enumerate(micro_batches):
        with run.parallel.no_sync(last_micro_batch=i == cfg.accum_steps - 1):
            with run.autocast:
                feats = run.model(xs, mask)
                with torch.no_grad():
                    target = run.teacher(xt)
            loss = run.loss_fn(feats, target, mask)  # in the dtypes autocast produced
            run.scaler.scale(loss / cfg.accum_steps).backward()
        finite = torch.isfinite(loss.detach())
        bad += (~finite).float()
        meter.add(loss.detach(), finite, xs.shape[0] * run.world)
        state.batch += 1
    if run.world > 1:  # every rank takes the same decision (and keeps the same streak)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    run.scaler.unscale_(run.opt)
    norm = nn.utils.clip_grad_norm_(run.student.parameters(), cfg.clip_grad or math.inf)
    if isinstance(norm, DTensor):  # FSDP: the norm over every rank's shards, replicated
        norm = norm.full_tensor()
    if run.scaler.is_enabled():
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.found_inf = ((bad > 0) | ~torch.isfinite(norm)).float()
        run.opt.step()
        run.opt.found_inf = None
    run.opt.zero_grad(set_to_none=True)
    run.teacher.update(run.student, state.step)
    state.step += 1
    state.bad_streak = torch.where(bad > 0, state.bad_streak + 1, 0.0)


def check_streak(cfg: Config, streak: int) -> None:
    if streak >= cfg.max_bad_steps:
        raise TrainingError(
            f"{streak} non-finite losses in a row (max_bad_steps); stopping. "
            "Lower lr, use bf16 or fp32, or check the data"
        )


def log_step(run: Run, state: RunState, meter: Meter) -> None:
    """Read what ``meter`` gathered (one host read), write a metrics record, and stop the run when the bad-step
    streak has reached ``max_bad_steps`` (so the stop comes at most ``log_every`` steps late)."""
    loss_sum, finite, streak = torch.cat([meter.sums, state.bad_streak.reshape(1)]).tolist()
    now = time.perf_counter()
    elapsed = now - meter.since
    step = state.step - 1  # the step just taken
    record = {"step": state.step, "epoch": state.epoch}
    if finite:
        record["loss"] = loss_sum / finite
    record.update(
        lr=lr_at(step, run.total_steps, run.warmup, run.cfg.lr, run.cfg.min_lr),
        momentum=run.teacher.momentum(step),
        images_per_s=meter.images / elapsed,
        data_wait_fraction=meter.wait / elapsed,
    )
    nonfinite = meter.losses - int(finite)
    if nonfinite or streak:
        record.update(nonfinite_losses=nonfinite, bad_streak=int(streak))
        run.log.msg(
            f"{nonfinite} non-finite loss(es) since the last log, at epoch {state.epoch}: their steps' updates "
            f"were skipped ({int(streak)} bad steps in a row)"
        )
    run.log.metrics(record)
    if "loss" in record:
        show(run, loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
    meter.reset(now)
    check_streak(run.cfg, int(streak))


def save_run_checkpoint(run: Run, state: RunState, epoch_end: bool) -> None:
    """Every rank checks the bad-step streak, then the strategy writes the weights, the optimizer and ``state``
    (with the epoch's position in images, which resumes at any world size); rank 0 prunes, and the ranks meet."""
    blob = state.state_dict()  # reads the streak: a checkpoint step may read the device
    check_streak(run.cfg, blob["bad_streak"])
    blob.update(
        images=state.batch * run.cfg.batch_size * run.world,
        scaler=run.scaler.state_dict(),
        arch=run.cfg.arch(),
    )
    path = run.parallel.save(run, blob, run.out / checkpoint_name(state.epoch, state.step))
    if run.rank == 0:
        prune(run.out, run.parallel.checkpoints(run.out), run.cfg.keep_last, run.cfg.keep_every_epochs)
        if epoch_end:
            _mark_epoch_end(run.out, path)
    if run.world > 1:
        torch.distributed.barrier()


def restore(run: Run, state: RunState) -> None:
    """Load the newest loadable checkpoint of the run folder, if any, into ``run`` and ``state``. The position
    in the epoch is the saved count of images over this run's images per optimizer step (rounded down, so a run
    resumed at another world size or ``accum_steps`` re-reads at most one step's images)."""
    saved = run.parallel.load(run)
    if saved is None:
        return
    run.scaler.load_state_dict(saved["scaler"])
    state.load_state_dict(saved)
    per_step = run.cfg.batch_size * run.world * run.cfg.accum_steps
    images = saved.get("images", state.batch * run.cfg.batch_size * run.world)  # older checkpoints: batches
    state.batch = images // per_step * run.cfg.accum_steps
    if state.batch >= run.steps_per_epoch * run.cfg.accum_steps:  # fewer steps per epoch here: it is over
        state.epoch, state.batch = state.epoch + 1, 0


def show(run: Run, **fields: str) -> None:
    """Update what the progress bar shows after its count (rank 0 with ``progress``)."""
    run.postfix.update(fields)
    if run.progress is not None:
        run.progress.set_postfix(run.postfix)


def monitor(run: Run, state: RunState) -> None:
    """The teacher's k-NN top-1 on ``eval_data`` (:func:`conmim.evaluate.knn_monitor`), computed by rank 0 alone
    (under FSDP every rank first joins the gather of the teacher), written to metrics.jsonl, the log and the
    progress bar. Before the first step it is the random-initialisation baseline (the teacher starts as a copy
    of the initial student), logged once per run as ``knn_top1_random_init``; later values state their gain."""
    model = run.parallel.eval_model(run)
    if model is None:
        return
    top1 = knn_monitor(model, data=run.cfg.eval_data)
    if state.step == 0:
        state.knn_random_init = top1
        run.log.metrics({"epoch": 0, "step": 0, "knn_top1_random_init": top1})
        run.log.msg(f"random initialisation: teacher k-NN top-1 {100 * top1:.2f}% (the baseline)")
        show(run, knn=f"{100 * top1:.1f}%")
        return
    run.log.metrics({"epoch": state.epoch, "step": state.step, "knn_top1": top1})
    gain = ""
    if state.knn_random_init is not None:
        gain = f" ({100 * (top1 - state.knn_random_init):+.2f} points over random initialisation)"
    run.log.msg(f"{state.epoch} epochs done, step {state.step}: teacher k-NN top-1 {100 * top1:.2f}%{gain}")
    show(run, knn=f"{100 * top1:.1f}%")


def _timed(run: Run, meter: Meter):
    """The loader's batches, the wait for each added to ``meter`` (and the indices recorded when asked)."""
    batches = iter(run.loader)
    while True:
        t0 = time.perf_counter()
        item = next(batches, None)
        meter.wait += time.perf_counter() - t0
        if item is None:
            return
        if run.cfg.record_samples:
            with open(run.out / f"samples-e{run.loader.epoch:04d}-r{run.rank}.txt", "a") as fh:
                fh.write(" ".join(map(str, run.loader.last_indices.tolist())) + "\n")
        yield item


def _start(cfg: Config, out: Path, rank: int, world: int, device: torch.device) -> Run:
    """Build (validating everything), then, and only then, write to the run folder."""
    run = build_run(cfg, rank, world, device, out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfgmod.dump(cfg, out / "config.yaml")
        write_bad_files(out, run.loader.folder.bad)
    if world > 1:
        torch.distributed.barrier()
    run.log = Logger(out, rank)
    for path, why in run.loader.folder.bad:
        run.log.msg(f"excluding {path}: {why}")
    return run


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns a summary. Raises TrainingError on bad input; a run that
    fails to start writes nothing to its run folder."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg.device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run = _start(cfg, Path(cfg.out).expanduser(), rank, world, device)
    try:
        summary = _train(run)
    finally:
        if run.progress is not None:
            run.progress.close()
        run.log.close()
    if world > 1:
        # every rank finishes its last collective and rank 0 its plot before any rank tears the group down:
        # a rank that destroyed its gloo group while its peer was still using the connection was seen to abort
        # at exit ("terminate called without an active exception") in one CI run
        torch.distributed.barrier()
    return summary


def _train(run: Run) -> dict:
    cfg, state = run.cfg, RunState(bad_streak=torch.zeros((), device=run.device))
    restore(run, state)
    if state.step >= run.total_steps:
        run.log.msg(f"already complete ({state.step} of {run.total_steps} steps); checkpoints in {run.out}")
        return {"steps": state.step, "epoch": state.epoch, "out": str(run.out)}
    run.log.msg(
        f"{len(run.loader.folder)} images, {run.loader.batches_per_epoch()} batches of {cfg.batch_size} x "
        f"{run.world} per epoch, {run.total_steps} optimizer steps, {cfg.model} on {run.device} "
        f"({run.loader.kind} loader)"
    )
    if cfg.eval_every and state.step == 0:
        monitor(run, state)  # the baseline, before the first step (and before the bar)
    if run.rank == 0 and cfg.progress:
        from tqdm import tqdm

        run.progress = tqdm(
            total=run.total_steps, initial=state.step, desc="conmim-train", unit="step", dynamic_ncols=True
        )
        show(run)  # the baseline's k-NN, if any
    meter = Meter(run.device)
    while state.step < run.total_steps and state.epoch < cfg.epochs:
        run.loader.set_epoch(state.epoch, state.batch)
        batches = _timed(run, meter)
        for _ in range(state.batch // cfg.accum_steps, run.steps_per_epoch):
            train_step(run, state, itertools.islice(batches, cfg.accum_steps), meter)
            if run.progress is not None:
                run.progress.update(1)
            finished = state.step >= run.total_steps
            if state.step % cfg.log_every == 0 or finished:
                log_step(run, state, meter)
            epoch_end = state.batch == run.steps_per_epoch * cfg.accum_steps
            if epoch_end:
                state.epoch, state.batch = state.epoch + 1, 0
            periodic = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
            if epoch_end or finished or periodic:
                save_run_checkpoint(run, state, epoch_end)
            if epoch_end and cfg.eval_every and state.epoch % cfg.eval_every == 0:
                monitor(run, state)
            if finished:
                break
    run.parallel.finish(run)
    plot = loss_plot(run.out) if run.rank == 0 else None
    run.log.msg(
        f"done: {state.step} steps; checkpoints in {run.out}" + (f"; loss curve {plot}" if plot else "")
    )
    return {"steps": state.step, "epoch": state.epoch, "out": str(run.out)}


@torch.no_grad()
def check_ranks_in_sync(
    student: nn.Module, teacher: MomentumTeacher, out: Path, rank: int, world: int, log
) -> None:
    """Gather a float64 checksum of every rank's student and teacher; rank 0 writes them to rank_checksums.json
    and stops the run with an error if they differ (DDP keeps replicas identical; a difference is a bug)."""
    sums = []
    for p in [*student.parameters(), *teacher.params]:
        q = p.detach().double()
        sums += [q.sum(), (q * q).sum()]
    local = torch.stack(sums)
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    if rank == 0:
        (out / "rank_checksums.json").write_text(json.dumps([g.tolist() for g in gathered]))
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise TrainingError("ranks ended with different weights (see rank_checksums.json)")
        log.msg(f"all {world} ranks hold identical student and teacher weights")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("options (--key value or --key=value; any key also in a YAML file given to --config):")
        print(f"  --config              a preset ({', '.join(cfgmod.PRESETS)}) or a YAML file of keys below")
        print(cfgmod.options_help())
        return 0
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("conmim-train: error: --config needs a preset name or a YAML file", file=sys.stderr)
            return 2
        config = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    try:
        cfg = cfgmod.resolve(config, cfgmod.parse_overrides(argv))
        train(cfg)
    except (cfgmod.ConfigError, TrainingError, FileNotFoundError, ValueError) as exc:
        print(f"conmim-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
