"""conmim-train: ConMIM pretraining, the loop and its command line.

The package does the work: the run and its validation (conmim.run), the loss (conmim.loss), the teacher
(conmim.teacher), masks and views (conmim.data), the network (conmim.models), the parallel strategy
(conmim.parallel), checkpoints (conmim.checkpoint) and what a run reports (conmim.metrics). This file reads top
to bottom: one step, its log, its checkpoint, the monitor, then the loop that builds a run, restores it and
steps until done.

    conmim-train --config tiny_demo                      # CPU demo on the bundled digits
    conmim-train --config vit_b --data /imagenet/train --out runs/vit_b
    torchrun --nproc_per_node 8 -m conmim.train --config vit_b --data ... --out ...
    torchrun --nproc_per_node 8 -m conmim.train --config vit_l --strategy fsdp --data ... --out ...
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch

from conmim import checkpoint as ckpt
from conmim import config as cfgmod
from conmim import recipes
from conmim.config import TrainConfig
from conmim.data import write_bad_files
from conmim.evaluate import knn_monitor
from conmim.metrics import Logger, Meter, loss_plot
from conmim.optim import lr_at
from conmim.parallel import ParallelError, dist_env, init_process_group, on_rank0, pick_device
from conmim.run import Run, RunState, TrainingError, build_run, restore, resumable

__all__ = ["TrainingError", "build_run", "main", "restore", "train", "train_step"]


def train_step(run: Run, state: RunState, micro_batches, meter: Meter) -> None:
    """One optimizer step over ``accum_steps`` micro-batches: forward, backward, optimizer, EMA. Reads nothing
    back from the device: a non-finite loss marks the step bad on the device, and the optimizer then skips it
    there (the fused AdamW's ``found_inf``; with fp16 the gradient scaler, which skips on inf/NaN gradients)."""
    cfg, p = run.cfg, run.parallel
    lr = lr_at(state.step, run.total_steps, run.warmup, cfg.lr, cfg.min_lr)
    for g in run.opt.param_groups:
        g["lr"] = lr
    bad = torch.zeros((), device=run.device)
    for i, (xs, xt, mask) in enumerate(micro_batches):
        with p.no_sync(last_micro_batch=i == cfg.accum_steps - 1):
            with run.autocast:
                feats = p.model(xs, mask)
                with torch.no_grad():
                    target = p.teacher(xt)
            loss = run.loss_fn(feats, target, mask)  # in the dtypes autocast produced
            run.scaler.scale(loss / cfg.accum_steps).backward()
        finite = torch.isfinite(loss.detach())
        bad += (~finite).float()
        meter.add(loss.detach(), finite, xs.shape[0] * run.world)
        state.batch += 1
    if run.world > 1:  # every rank takes the same decision (and keeps the same streak)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    run.scaler.unscale_(run.opt)
    norm = p.grad_norm(cfg.clip_grad or math.inf)
    if run.scaler.is_enabled():
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.found_inf = ((bad > 0) | ~torch.isfinite(norm)).float()
        run.opt.step()
        run.opt.found_inf = None
    run.opt.zero_grad(set_to_none=True)
    p.teacher.update(p.student, state.step)
    state.step += 1
    state.bad_streak = torch.where(bad > 0, state.bad_streak + 1, 0.0)


def check_streak(cfg: TrainConfig, streak: int) -> None:
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
        momentum=run.parallel.teacher.momentum(step),
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
    """Check the bad-step streak, then every rank writes the weights, the optimizer and ``state`` (with the
    epoch's position in images, which resumes at any world size) as one checkpoint; older ones are pruned."""
    blob = state.state_dict()  # reads the streak: a checkpoint step may read the device
    check_streak(run.cfg, blob["bad_streak"])
    blob.update(
        images=state.batch * run.cfg.batch_size * run.world,
        scaler=run.scaler.state_dict(),
        arch=cfgmod.arch(run.cfg),
    )
    info = resumable(run.cfg, run.world)
    run.checkpoints.save(run.parts, blob, state.epoch, state.step, epoch_end, info)


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
    model = run.parallel.eval_model()
    if model is None:
        return
    top1 = knn_monitor(model, data=run.cfg.eval_data)
    where = f"teacher k-NN top-1 on {run.cfg.eval_data}"
    if state.step == 0:
        state.knn_random_init = top1
        run.log.metrics({"epoch": 0, "step": 0, "knn_top1_random_init": top1, "knn_data": run.cfg.eval_data})
        run.log.msg(f"random initialisation: {where} {100 * top1:.2f}% (the baseline)")
    else:
        run.log.metrics(
            {"epoch": state.epoch, "step": state.step, "knn_top1": top1, "knn_data": run.cfg.eval_data}
        )
        gain = ""
        if state.knn_random_init is not None:
            gain = f" ({100 * (top1 - state.knn_random_init):+.2f} points over random initialisation)"
        run.log.msg(f"{state.epoch} epochs done, step {state.step}: {where} {100 * top1:.2f}%{gain}")
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


def _start(cfg: TrainConfig, out: Path, rank: int, world: int, device: torch.device) -> Run:
    """Build (validating everything), then, and only then, take the run folder and write to it."""
    run = build_run(cfg, rank, world, device, out)

    def take_folder():
        run.lock = ckpt.lock_run_folder(out)  # held until the process ends
        cfgmod.dump(cfg, out / "config.yaml")
        write_bad_files(out, run.loader.folder.bad)

    on_rank0(take_folder, (OSError, ckpt.CheckpointError))
    run.log = Logger(out, rank)
    run.checkpoints.log = run.log.msg
    for path, why in run.loader.folder.bad:
        run.log.msg(f"excluding {path}: {why}")
    return run


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary. Raises TrainingError on bad input; a run that
    fails to start writes nothing to its run folder."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg.device, local_rank)
    if world > 1:
        init_process_group(device)
    run = _start(cfg, Path(cfg.out).expanduser(), rank, world, device)
    try:
        summary = _train(run)
    finally:
        if run.progress is not None:
            run.progress.close()
        run.log.close()
        if run.lock is not None:
            os.close(run.lock)  # the run is over; a crash releases it too (the OS does)
    if world > 1:  # every rank finishes its last collective before any tears the group down
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
    images_per_step = run.images_per_step
    run.log.msg(recipes.batch_line(cfg.model, images_per_step, cfg.lr))
    if note := recipes.batch_note(cfg.model, images_per_step, cfg.lr):
        run.log.msg(f"warning: {note}")
    if run.init is not None and state.step == 0:  # a resumed run's weights come from its checkpoint
        for line in run.init.lines():
            run.log.msg(line)
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
    run.parallel.finish(run.out, run.log.msg)
    label = f"teacher k-NN top-1 on {cfg.eval_data} (%)"
    plot = loss_plot(run.out, knn_label=label) if run.rank == 0 else None
    run.log.msg(
        f"done: {state.step} steps; checkpoints in {run.out}" + (f"; loss curve {plot}" if plot else "")
    )
    return {"steps": state.step, "epoch": state.epoch, "out": str(run.out)}


def parser():
    """conmim-train's argparse, generated from :class:`conmim.config.TrainConfig`'s fields."""
    doc = __doc__.split("\n\n")
    return cfgmod.parser(TrainConfig, "conmim-train", doc[0], "\n\n".join(doc[2:]))


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(sys.argv[1:] if argv is None else argv))
    try:
        train(cfgmod.resolve(TrainConfig, args.pop("config", None), args))
    except (
        cfgmod.ConfigError,
        TrainingError,
        ParallelError,
        ckpt.CheckpointError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"conmim-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
