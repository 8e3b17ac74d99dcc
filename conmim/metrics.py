"""What a run reports: metrics.jsonl (rank 0), TensorBoard when installed, messages on stderr, and the plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


class Logger:
    """JSON lines (rank 0), TensorBoard when installed, and plain messages on stderr prefixed by ``prog``."""

    def __init__(self, out: Path, rank: int, prog: str = "conmim-train"):
        self.rank, self.prog = rank, prog
        self.file = open(Path(out) / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (kept for the run)
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tb"))
            except Exception:
                self.tb = None

    def msg(self, text: str) -> None:
        if self.rank == 0:
            print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

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


def read_metrics(out: Path) -> list[dict]:
    """The records of ``out``/metrics.jsonl; a line that is not a JSON object (a torn write) is skipped."""
    rows = []
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_plot(out: Path, knn_label: str = "teacher k-NN top-1 (%)") -> Path | None:
    """loss_curve.png from metrics.jsonl: the loss, and the teacher's k-NN top-1 (right axis, ``knn_label``)
    beside its random-initialisation baseline when the run has ``eval_every``. None without matplotlib or
    without a loss to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out)
    losses = [r for r in rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="C0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ConMIM loss", color="C0")
    ax.set_title(Path(out).name)
    knn = [r for r in rows if "knn_top1" in r]
    base = [r["knn_top1_random_init"] for r in rows if "knn_top1_random_init" in r]
    if knn or base:
        right = ax.twinx()
        right.plot(
            [r["step"] for r in knn], [100 * r["knn_top1"] for r in knn], "o-", color="C1", label="teacher"
        )
        if base:
            right.axhline(100 * base[-1], color="C1", linestyle="--", linewidth=1, label="random init")
        right.set_ylabel(knn_label, color="C1")
        right.legend(loc="center right", fontsize="small")
    fig.tight_layout()
    path = Path(out) / "loss_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
