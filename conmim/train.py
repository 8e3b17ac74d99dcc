"""conmim-train: the ConMIM pretraining driver.

Thin by design: the loss (conmim.loss), the teacher (conmim.teacher), masks and views (conmim.data) and the
network (conmim.models) come from the package; this file wires them into a loop with a schedule, mixed
precision, checkpoints that survive a kill, logging, and torchrun/DDP.

    conmim-train --config tiny_demo                      # CPU demo on the bundled digits
    conmim-train --config vit_b --data /imagenet/train --out runs/vit_b
    torchrun --nproc_per_node 8 -m conmim.train --config vit_b --data ... --out ...
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from conmim import config as cfgmod
from conmim.data import MaskConfig, ViewConfig, build_loader, samples
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
    """An image folder, or samples:photos / samples:mnist (built once under $CONMIM_SAMPLES or ~/.cache)."""
    if spec.startswith("samples:"):
        which = spec.split(":", 1)[1]
        if which not in ("photos", "mnist"):
            raise TrainingError(f"data {spec!r}: bundled sets are samples:photos and samples:mnist")
        dest = Path(os.environ.get("CONMIM_SAMPLES", Path.home() / ".cache" / "conmim" / "samples"))
        built = samples.build(dest, photos=which == "photos", mnist=which == "mnist")
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


def save_checkpoint(out: Path, state: dict, epoch: int, step: int, keep_last: int, keep_every: int) -> Path:
    """Write atomically (temp file, fsync, rename), then prune: the newest ``keep_last`` plus every checkpoint
    that ends an epoch divisible by ``keep_every``."""
    path = out / f"ckpt-e{epoch:04d}-s{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    ends = _epoch_ends(out)
    for old in checkpoints(out)[keep_last:]:
        epoch_of = int(old.stem.split("-")[1][1:])  # ckpt-e<epoch>-s<step>
        if not (old.name in ends and keep_every > 0 and epoch_of % keep_every == 0):
            old.unlink(missing_ok=True)
    return path


def _epoch_ends(out: Path) -> set[str]:
    f = out / "epoch_ends.json"
    return set(json.loads(f.read_text())) if f.exists() else set()


def _mark_epoch_end(out: Path, path: Path) -> None:
    ends = _epoch_ends(out) | {path.name}
    tmp = out / "epoch_ends.json.tmp"
    tmp.write_text(json.dumps(sorted(ends)))
    os.replace(tmp, out / "epoch_ends.json")


def load_latest(out: Path, log) -> dict | None:
    """The newest checkpoint that loads (``weights_only=True``: nothing in the file can run code); a file that
    fails to load is reported and the previous one is tried."""
    for path in checkpoints(out):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "student" not in state:
                raise ValueError("not a conmim checkpoint")
            log(
                f"resuming from {path.name} (epoch {state['epoch']}, batch {state['batch']}, step {state['step']})"
            )
            return state
        except Exception as exc:
            log(
                f"checkpoint {path.name} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); trying the previous one"
            )
    return None


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
    """loss_curve.png from metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ConMIM loss")
    ax.set_title(out.name)
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_compatible(out: Path, cfg: dict) -> None:
    """Refuse an output folder that holds another run's configuration (a different network)."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    old = cfgmod._read_yaml(saved.read_text(), str(saved))
    diff = [k for k in cfgmod.ARCH_KEYS if old.get(k) != cfg.get(k)]
    if diff and checkpoints(out):
        what = ", ".join(f"{k}: {old.get(k)!r} there vs {cfg.get(k)!r} here" for k in diff)
        raise TrainingError(
            f"output folder {str(out)!r} holds checkpoints of another run ({what}); choose another --out"
        )


def train(cfg: dict) -> dict:
    """Run (or resume) training as configured; returns a summary. Raises TrainingError on bad input."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg["device"], local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(cfg["out"]).expanduser()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_compatible(out, cfg)
        cfgmod.dump(cfg, out / "config.yaml")
    if world > 1:
        torch.distributed.barrier()
    log = Logger(out, rank)
    try:
        summary = _train(cfg, rank, world, device, out, log)
    finally:
        log.close()
    if world > 1:
        # every rank finishes its last collective and rank 0 its plot before any rank tears the group down:
        # a rank that destroyed its gloo group while its peer was still using the connection was seen to abort
        # at exit ("terminate called without an active exception") in one CI run
        torch.distributed.barrier()
    return summary


def _train(cfg, rank, world, device, out, log) -> dict:
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    data_root = resolve_data(cfg["data"])
    views = ViewConfig(
        image_size=cfg["image_size"], perturb=cfg["perturb"], scale=(cfg["crop_scale_min"], 1.0)
    )
    masks = MaskConfig(
        kind=cfg["mask"], patch_size=cfg["patch_size"], ratio=cfg["mask_ratio"], cell=cfg["mask_cell"]
    )
    loader = build_loader(
        data_root,
        cfg["batch_size"],
        views,
        masks,
        cfg["loader"],
        device,
        rank,
        world,
        cfg["seed"],
        cfg["num_workers"],
        drop_last=True,
        run_dir=out if rank == 0 else None,
        verbose=rank == 0,
    )
    batches = loader.batches_per_epoch()
    if batches == 0:
        raise TrainingError(
            f"{len(loader.folder)} usable images give no full batch of {cfg['batch_size']} per rank"
        )
    steps_per_epoch = batches // cfg["accum_steps"]
    total_steps = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"]:
        total_steps = min(total_steps, int(cfg["max_steps"]))
    warmup = int(cfg["warmup_epochs"] * steps_per_epoch)

    student = build_encoder(
        cfg["model"],
        cfg["head_hidden"],
        cfg["head_out"],
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
    ).to(device)
    teacher = MomentumTeacher(student, cfg["base_momentum"], cfg["final_momentum"], max(1, total_steps))
    opt = torch.optim.AdamW(
        param_groups(student, cfg["weight_decay"]), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"])
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
    loss_fn = FusedPatchContrastLoss(temperature=cfg["temperature"])

    epoch, batch, step, bad_streak = 0, 0, 0, 0
    state = load_latest(out, log.msg)
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, batch, step, bad_streak = state["epoch"], state["batch"], state["step"], state["bad_streak"]
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg["compile"]:
        model = torch.compile(model)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16)
        if cfg["precision"] != "fp32"
        else nullcontext()
    )

    def checkpoint(at_epoch_end: bool):
        if rank == 0:
            blob = {
                "student": student.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "epoch": epoch,
                "batch": batch,
                "step": step,
                "bad_streak": bad_streak,
                "arch": {k: cfg[k] for k in cfgmod.ARCH_KEYS},
            }
            path = save_checkpoint(out, blob, epoch, step, cfg["keep_last"], cfg["keep_every_epochs"])
            if at_epoch_end:
                _mark_epoch_end(out, path)
        if world > 1:
            torch.distributed.barrier()

    progress = None
    if rank == 0 and cfg["progress"]:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="conmim-train", unit="step", dynamic_ncols=True)
    log.msg(
        f"{len(loader.folder)} images, {batches} batches of {cfg['batch_size']} x {world} per epoch, "
        f"{total_steps} optimizer steps, {cfg['model']} on {device} ({loader.kind} loader)"
    )
    t_last, wait, images, losses = time.perf_counter(), 0.0, 0, []
    opt.zero_grad(set_to_none=True)
    done = step >= total_steps
    while not done and epoch < cfg["epochs"]:
        loader.set_epoch(epoch, batch)
        t_wait = time.perf_counter()
        for xs, xt, mask in loader:
            wait += time.perf_counter() - t_wait
            if cfg["record_samples"]:
                with open(out / f"samples-e{epoch:04d}-r{rank}.txt", "a") as fh:
                    fh.write(" ".join(map(str, loader.last_indices.tolist())) + "\n")
            with autocast:
                feats = model(xs, mask)
                with torch.no_grad():
                    target = teacher(xt)
            loss = loss_fn(feats.float(), target.float(), mask)
            batch += 1
            if not torch.isfinite(loss):
                bad_streak += 1
                opt.zero_grad(set_to_none=True)
                log.metrics(
                    {
                        "step": step,
                        "epoch": epoch,
                        "nonfinite_loss": float(loss.detach()),
                        "bad_streak": bad_streak,
                    }
                )
                log.msg(
                    f"non-finite loss at epoch {epoch} batch {batch}: step skipped ({bad_streak} in a row)"
                )
                if bad_streak >= cfg["max_bad_steps"]:
                    raise TrainingError(
                        f"{bad_streak} non-finite losses in a row (max_bad_steps); stopping. "
                        "Lower lr, use bf16 or fp32, or check the data"
                    )
                t_wait = time.perf_counter()
                continue
            scaler.scale(loss / cfg["accum_steps"]).backward()
            losses.append(float(loss.detach()))
            images += xs.shape[0] * world
            if batch % cfg["accum_steps"]:
                t_wait = time.perf_counter()
                continue
            lr = lr_at(step, total_steps, warmup, cfg["lr"], cfg["min_lr"])
            for g in opt.param_groups:
                g["lr"] = lr
            scaler.unscale_(opt)
            if cfg["clip_grad"]:
                nn.utils.clip_grad_norm_(student.parameters(), cfg["clip_grad"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            momentum = teacher.momentum(step)
            teacher.update(student, momentum=momentum)
            step += 1
            bad_streak = 0
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
            if step % cfg["log_every"] == 0 or step == total_steps:
                now = time.perf_counter()
                log.metrics(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": sum(losses) / len(losses),
                        "lr": lr,
                        "momentum": momentum,
                        "images_per_s": images / (now - t_last),
                        "data_wait_fraction": wait / (now - t_last),
                    }
                )
                t_last, wait, images, losses = now, 0.0, 0, []
            if step >= total_steps:
                done = True
                break
            if cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0:
                checkpoint(False)
            t_wait = time.perf_counter()
        if not done:
            epoch, batch = epoch + 1, 0
        checkpoint(not done)
    if progress is not None:
        progress.close()
    if world > 1:
        check_ranks_in_sync(student, teacher, out, rank, world, log)
    plot = loss_plot(out) if rank == 0 else None
    log.msg(f"done: {step} steps; checkpoints in {out}" + (f"; loss curve {plot}" if plot else ""))
    return {"steps": step, "epoch": epoch, "out": str(out)}


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
        print(
            "options: --config PRESET_OR_FILE (presets: " + ", ".join(cfgmod.PRESETS) + "), then --key value "
            "for any key of conmim/configs/default.yaml"
        )
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
