"""Does pretraining learn? ``python -m benchmarks.fidelity [--epochs 20] [--seeds 0 1] [--out runs/fidelity] [--no-save]``

For each seed: pretrain the tiny ViT on the bundled MNIST-5k digits with the README's command
(``conmim-train --config tiny_demo --epochs E --seed S --out OUT/seed-S``), then k-NN and linear-probe top-1 of
the teacher and the student against the same architecture at random initialisation (``conmim-eval``'s
functions, mean-pooled patch features). Writes benchmarks/results/fidelity-<device>-<date>.json with the exact
commands, the commit and the versions. CPU only; about 8 minutes per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, commit, device_name, device_slug, versions
from conmim.evaluate import evaluate

DATA = "samples:mnist"


def train_command(epochs: int, seed: int, out: Path) -> list[str]:
    return [
        "conmim-train",
        "--config",
        "tiny_demo",
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def run_seed(epochs: int, seed: int, out: Path) -> dict:
    """Train (resuming if ``out`` already holds this run) and evaluate; returns the seed's record."""
    cmd = train_command(epochs, seed, out)
    resumed = any(out.glob("ckpt-*.pt"))  # then train_s covers only what was left to train
    if resumed:
        print(f"{out} holds checkpoints: resuming that run (delete the folder for a fresh one)", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conmim.train", *cmd[1:]], check=True)
    record = {"seed": seed, "command": " ".join(cmd), "train_s": round(time.perf_counter() - t0, 1)}
    record["resumed_existing_run"] = resumed
    for mode in ("knn", "linear"):
        for which in ("teacher", "student"):
            record[f"{mode}_{which}"] = evaluate(mode, str(out), DATA, which=which)
        record[f"{mode}_random_init"] = evaluate(mode, str(out), DATA, random_init=True)
        print(
            f"seed {seed} {mode}: teacher {100 * record[f'{mode}_teacher']:.1f}%, student "
            f"{100 * record[f'{mode}_student']:.1f}%, random init {100 * record[f'{mode}_random_init']:.1f}%",
            flush=True,
        )
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__)
    p.add_argument("--epochs", type=int, default=20, help="pretraining epochs over the 4,000 training digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/fidelity", help="run folders go here, one per seed")
    p.add_argument("--no-save", action="store_true", help="print only; write no results file")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    device = torch.device("cpu")
    records = [run_seed(args.epochs, s, Path(args.out) / f"seed-{s}") for s in args.seeds]
    if args.no_save:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = RESULTS / f"fidelity-{device_slug(device)}-{date}.json"
    payload = {
        "what": "k-NN (k=20, cosine, exp(sim/0.07)) and linear-probe top-1 on the bundled MNIST-5k split "
        "(4,000 train / 1,000 val), mean-pooled patch features, after pretraining the tiny ViT",
        "device": device_name(device),
        "date": date,
        "commit": commit(),
        "versions": versions(),
        "epochs": args.epochs,
        "eval_commands": [
            "conmim-eval knn RUN --data samples:mnist --which teacher --compare-random",
            "conmim-eval knn RUN --data samples:mnist --which student",
            "conmim-eval linear RUN --data samples:mnist --which teacher --compare-random",
            "conmim-eval linear RUN --data samples:mnist --which student",
        ],
        "runs": records,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
