"""Does pretraining learn? ``python -m benchmarks.fidelity [--epochs 20 | --demo] [--seeds 0 1]
[--loader auto|dali|torch] [--out runs/fidelity] [--init-seeds 0 1 2 3] [--baseline-only] [--no-save]``

For each seed: pretrain the tiny ViT on the bundled MNIST-5k digits with the README's command
(``conmim-train --config tiny_demo --epochs E --seed S --out OUT/seed-S``), then k-NN and linear-probe top-1 of
the teacher and the student against the same architecture at random initialisation (``conmim-eval``'s
functions, mean-pooled patch features), and the random-init baseline at each of ``--init-seeds``, to show its own
spread. Writes benchmarks/results/fidelity-<device>-<date>.json with the exact commands, the commit and the
versions. CPU only; about 8 minutes per seed on 2 cores. ``--baseline-only`` measures just the spread on an
existing run's architecture and writes fidelity-baseline-<device>-<date>.json. ``--demo`` runs the README's run
command unchanged (the tiny demo's own epochs; its k-NN monitor logs the baseline and the teacher's k-NN), times
it from start to finish, and writes fidelity-demo-<device>-<date>.json: the demo's learning figure.
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
from conmim.checkpoint import checkpoints
from conmim.evaluate import evaluate

DATA = "samples:mnist"


def train_command(epochs: int | None, seed: int, out: Path, loader: str = "auto") -> list[str]:
    """The README's run command with a seed and a run folder (and the preset's epochs when ``epochs`` is None);
    ``loader`` torch is what a plain ``pip install -e .`` (no DALI) runs."""
    cmd = ["conmim-train", "--config", "tiny_demo"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if loader != "auto":
        cmd += ["--loader", loader]
    return [*cmd, "--seed", str(seed), "--out", str(out)]


def monitored(out: Path) -> dict:
    """What the run's own k-NN monitor logged: its baseline and its last value (fractions), or {}."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base = [r["knn_top1_random_init"] for r in rows if "knn_top1_random_init" in r]
    knn = [r for r in rows if "knn_top1" in r]
    if not (base and knn):
        return {}
    return {
        "monitor_knn_random_init": base[-1],
        "monitor_knn_teacher": knn[-1]["knn_top1"],
        "steps": knn[-1]["step"],
    }


def run_seed(epochs: int | None, seed: int, out: Path, loader: str = "auto") -> dict:
    """Train (resuming if ``out`` already holds this run) and evaluate; returns the seed's record."""
    cmd = train_command(epochs, seed, out, loader)
    resumed = bool(checkpoints(out))  # then train_s covers only what was left to train
    if resumed:
        print(f"{out} holds checkpoints: resuming that run (delete the folder for a fresh one)", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conmim.train", *cmd[1:]], check=True)
    record = {"seed": seed, "command": " ".join(cmd), "train_s": round(time.perf_counter() - t0, 1)}
    record["resumed_existing_run"] = resumed
    record.update(monitored(out))
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


def random_init_spread(source: Path, init_seeds: list[int]) -> list[dict]:
    """k-NN and linear top-1 of the architecture in ``source`` at several random initialisations: how much the
    random-init baseline itself moves."""
    out = []
    for s in init_seeds:
        rec = {m: evaluate(m, str(source), DATA, random_init=True, init_seed=s) for m in ("knn", "linear")}
        print(f"random init {s}: knn {100 * rec['knn']:.1f}%, linear {100 * rec['linear']:.1f}%", flush=True)
        out.append({"init_seed": s, **rec})
    return out


def _save(name: str, payload: dict) -> None:
    device = torch.device("cpu")
    date = _dt.date.today().isoformat()
    path = RESULTS / f"{name}-{device_slug(device)}-{date}.json"
    head = {"device": device_name(device), "date": date, "commit": commit(), "versions": versions()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, **head}, indent=1) + "\n")
    print(f"wrote {path}")


WHAT = (
    "k-NN (k=20, cosine, exp(sim/0.07)) and linear-probe top-1 on the bundled MNIST-5k split (4,000 train / "
    "1,000 val), mean-pooled patch features"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__)
    p.add_argument("--epochs", type=int, default=20, help="pretraining epochs over the 4,000 training digits")
    p.add_argument(
        "--demo",
        action="store_true",
        help="the README's run command as is (the preset's epochs, not --epochs), timed: the demo's figure",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--loader",
        choices=("auto", "dali", "torch"),
        default="auto",
        help="the run command's loader (auto: DALI when installed; torch: a plain install's)",
    )
    p.add_argument("--out", default="runs/fidelity", help="run folders go here, one per seed")
    p.add_argument(
        "--init-seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="random inits for the baseline"
    )
    p.add_argument(
        "--baseline-only",
        action="store_true",
        help="only the random-init spread, on the architecture of OUT/seed-<first seed> (no training)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; write no results file")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    first = Path(args.out) / f"seed-{args.seeds[0]}"
    if args.baseline_only:
        if not (first / "config.yaml").is_file():
            p.error(f"--baseline-only: {first} holds no run (config.yaml); train it first")
        spread = random_init_spread(first, args.init_seeds)
        if not args.no_save:
            _save("fidelity-baseline", {"what": WHAT + ", at random initialisation", "random_inits": spread})
        return 0
    epochs = None if args.demo else args.epochs
    records = [run_seed(epochs, s, Path(args.out) / f"seed-{s}", args.loader) for s in args.seeds]
    spread = random_init_spread(first, args.init_seeds)
    if args.no_save:
        return 0
    payload = {
        "what": WHAT + (", after the README's demo" if args.demo else ", after pretraining the tiny ViT"),
        "epochs": epochs or "the tiny_demo preset's",
        "eval_commands": [
            "conmim-eval knn RUN --data samples:mnist --which teacher --compare-random",
            "conmim-eval knn RUN --data samples:mnist --which student",
            "conmim-eval linear RUN --data samples:mnist --which teacher --compare-random",
            "conmim-eval linear RUN --data samples:mnist --which student",
        ],
        "runs": records,
        "random_inits": spread,
    }
    payload["loader"] = args.loader
    name = "fidelity-demo" if args.demo else "fidelity"
    _save(name if args.loader == "auto" else f"{name}-{args.loader}-loader", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
