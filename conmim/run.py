"""A pretraining run: what it trains with, built and validated from a :class:`conmim.config.TrainConfig`
(:func:`build_run`, which writes nothing), where it stands (:class:`RunState`, what a checkpoint saves besides
the weights), and its restoration from the newest verified checkpoint (:func:`restore`). The loop that drives a
run is :mod:`conmim.train`.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from conmim import checkpoint as ckpt
from conmim import config as cfgmod
from conmim import models
from conmim.config import TrainConfig
from conmim.data import MaskConfig, ViewConfig, build_loader, resolve_data
from conmim.evaluate import labelled_split
from conmim.loss import FusedPatchContrastLoss
from conmim.metrics import Logger
from conmim.models import build_encoder
from conmim.optim import adamw
from conmim.parallel import PRECISIONS, STRATEGIES


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why."""


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves besides the weights, the optimizer and the RNG states.

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
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.bad_streak = torch.full((), float(state["bad_streak"]), device=self.bad_streak.device)
        self.knn_random_init = state.get("knn_random_init")
        ckpt.set_rng_state(state["rng"])


@dataclass
class Run:
    """Everything one run trains with, built once by :func:`build_run`."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    out: Path
    loader: object  # conmim.data.TwoViewLoader
    parallel: object  # a conmim.parallel strategy: model, student, teacher, ...
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    autocast: object
    steps_per_epoch: int
    total_steps: int
    warmup: int
    checkpoints: ckpt.CheckpointManager
    init: object = None  # the report of init_from, if any (conmim.models.InitReport)
    log: Logger | None = None
    lock: int | None = None  # the run folder's lock (a file descriptor), held while the run trains
    progress: object = None
    postfix: dict = field(default_factory=dict)  # what the progress bar shows after the count

    @property
    def parts(self) -> dict:
        """What a checkpoint holds besides the run state."""
        p = self.parallel
        return {"student": p.student, "teacher": p.teacher.module, "optimizer": (p.student, self.opt)}

    @property
    def images_per_step(self) -> int:
        return self.cfg.batch_size * self.world * self.cfg.accum_steps


def resumable(cfg: TrainConfig, world: int) -> dict:
    """What every checkpoint of a run folder must share with a run that resumes there: the network, and the
    images per optimizer step (batch_size x ranks x accum_steps; the ranks and accum_steps may change as long as
    the product does not, so the schedule continues exactly)."""
    return {"arch": cfgmod.arch(cfg), "images_per_step": cfg.batch_size * world * cfg.accum_steps}


def build_run(cfg: TrainConfig, rank: int, world: int, device: torch.device, out: Path) -> Run:
    """Validate the data, the model and the run folder, and build the run; writes nothing."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {str(out)!r} is a file, not a run folder")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    views = ViewConfig(
        image_size=cfg.image_size, perturb=cfg.perturb, scale=(cfg.crop_scale_min, 1.0), channels=cfg.in_chans,
        mean=cfg.mean, std=cfg.std,
    )  # fmt: skip
    masks = MaskConfig(kind=cfg.mask, patch_size=cfg.patch_size, ratio=cfg.mask_ratio, cell=cfg.mask_cell)
    loader = build_loader(  # run_dir None, verbose False: nothing is written before everything is validated
        resolve_data(cfg.data), cfg.batch_size, views=views, masks=masks, loader=cfg.loader, device=device,
        rank=rank, world_size=world, seed=cfg.seed, num_workers=cfg.num_workers, drop_last=True, run_dir=None,
        verbose=False, scan=cfg.scan, progress=rank == 0,
    )  # fmt: skip
    batches = loader.batches_per_epoch()
    if batches < cfg.accum_steps:
        raise TrainingError(
            f"{len(loader.folder)} usable images give {batches} full batches of {cfg.batch_size} per rank, "
            f"fewer than accum_steps = {cfg.accum_steps}"
        )
    try:  # before anything is written: a run folder of conmim 0.1, another network or another schedule
        ckpt.check_resumable(out, resumable(cfg, world))
    except ckpt.CheckpointError as exc:
        raise TrainingError(str(exc)) from None
    if cfg.eval_every:
        labelled_split(cfg.eval_data)  # the k-NN monitor's folder, checked before anything is written
    steps_per_epoch = batches // cfg.accum_steps
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    student = build_encoder(
        cfg.model, cfg.head_hidden, cfg.head_out, img_size=cfg.image_size, patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
    )  # fmt: skip
    try:  # before the strategy copies the student into the teacher
        init = models.init_from(student, cfg.init_from) if cfg.init_from else None
    except (FileNotFoundError, ValueError, TypeError, ckpt.CheckpointError) as exc:
        raise TrainingError(f"init_from {cfg.init_from!r}: {exc}") from None
    student.to(device)
    momentum = dict(
        base_momentum=cfg.base_momentum, final_momentum=cfg.final_momentum, total_steps=total_steps
    )
    options = {k: getattr(cfg, k) for k in ("precision", "grad_checkpointing", "reshard_after_forward")}
    parallel = STRATEGIES[cfg.strategy](student, device, momentum, **options)
    if cfg.compile:
        parallel.model = torch.compile(parallel.model)
    low = PRECISIONS[cfg.precision] if cfg.precision != "fp32" else None
    scaled = low is torch.float16
    fused = not scaled or parallel.fused_adamw_with_scaler  # skips a bad step on the device, no host read
    opt = adamw(parallel.student, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, fused)
    return Run(
        cfg=cfg, device=device, rank=rank, world=world, out=out, loader=loader, parallel=parallel, opt=opt,
        scaler=parallel.grad_scaler(device.type, enabled=scaled),
        loss_fn=FusedPatchContrastLoss(temperature=cfg.temperature),
        autocast=torch.autocast(device.type, dtype=low) if low is not None else nullcontext(),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup=int(cfg.warmup_epochs * steps_per_epoch),
        checkpoints=ckpt.CheckpointManager(out, cfg.keep_last, cfg.keep_every_epochs), init=init,
    )  # fmt: skip


def restore(run: Run, state: RunState) -> None:
    """Load the newest verified checkpoint of the run folder, if any, into ``run`` and ``state``; the epoch's
    position is the saved count of images (:func:`build_run` made sure the images per step agree)."""
    saved = run.checkpoints.load_latest(run.parts)
    if saved is None:
        if ckpt.checkpoints(run.out):  # starting over would prune them away
            raise TrainingError(
                f"run folder {str(run.out)!r} holds checkpoints but none can be used (see above): move them "
                "away to start over, or choose another --out"
            )
        return
    run.scaler.load_state_dict(saved["scaler"])
    state.load_state_dict(saved)
    state.batch = saved["images"] // run.images_per_step * run.cfg.accum_steps
