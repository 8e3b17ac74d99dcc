"""What pretraining buys with few labels: ``python -m benchmarks.finetune_demo [--pretrained RUN] [--seeds 0 1]
[--out runs/finetune_demo] [--jobs 2] [--no-save]``

Fine-tunes the README demo's teacher (``conmim-train --config tiny_demo``; pretrained here first unless
``--pretrained`` names its run folder) on 10% of the bundled digits' training split with the ``cpu_demo``
preset, and the same recipe from random initialisation, for each seed:

    conmim-finetune --config cpu_demo --init RUN --seed S --out OUT/pretrained-S
    conmim-finetune --config cpu_demo --init none --model vit_tiny_demo --image_size 32 --patch_size 4 \\
        --seed S --out OUT/scratch-S

The two runs of a seed go in parallel (``--jobs 2``, one torch thread each: one per core of a 2-core machine).
Writes benchmarks/results/finetune-demo-<device>-<date>.json: both initialisations' top-1/top-5 per seed, the
margin, the wall and CPU time of the fine-tuning (and, separately, of the pretraining when it ran here), the
load average before and after (the machine may be shared), the commit and the versions. CPU only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, commit, device_name, device_slug, versions

PRESET = "cpu_demo"
SCRATCH_ARCH = ["--model", "vit_tiny_demo", "--image_size", "32", "--patch_size", "4"]


def finetune_command(init: str, seed: int, out: Path) -> list[str]:
    arch = SCRATCH_ARCH if init == "none" else []
    return ["conmim-finetune", "--config", PRESET, "--init", init, *arch, "--seed", str(seed), "--out", str(out),
            "--progress", "false"]  # fmt: skip


def _python(cmd: list[str]) -> list[str]:
    """A console-script command run through this interpreter's module (the same code without an install)."""
    module = {"conmim-finetune": "conmim.finetune", "conmim-train": "conmim.train"}[cmd[0]]
    return [sys.executable, "-m", module, *cmd[1:]]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pretrain_summary(run_dir: Path) -> dict:
    """The pretraining run's own record: its folder, the command that makes it, and its teacher k-NN monitor
    (random-init baseline and last value) from its metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    base = [r["knn_top1_random_init"] for r in rows if "knn_top1_random_init" in r]
    knn = [r for r in rows if "knn_top1" in r]
    return {
        "run": str(run_dir), "command": "conmim-train --config tiny_demo --out RUN",
        "steps": max((r["step"] for r in rows), default=0),
        "knn_top1_random_init": base[-1] if base else None, "knn_top1_teacher": knn[-1]["knn_top1"] if knn else None,
    }  # fmt: skip


def run_all(commands: list[list[str]], jobs: int) -> list[float]:
    """Run ``commands`` at most ``jobs`` at a time, one torch thread each; each one's wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    walls = [0.0] * len(commands)
    pending, running = list(enumerate(commands)), {}
    while pending or running:
        while pending and len(running) < jobs:
            i, cmd = pending.pop(0)
            running[i] = (subprocess.Popen(_python(cmd), env=env), time.perf_counter())
        for i, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"failed ({proc.returncode}): {' '.join(commands[i])}")
                walls[i] = time.perf_counter() - t0
                del running[i]
        time.sleep(0.2)
    return walls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pretrained", help="an existing conmim-train --config tiny_demo run folder (default: pretrain)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/finetune_demo")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    result = {"what": "low-label fine-tuning on the bundled digits: 10% of the 4,000 training images (40 per "
              "class), top-1/top-5 on all 1,000 validation images, the README demo's teacher vs random init"}  # fmt: skip
    load = {"before": os.getloadavg()}
    pretrained = args.pretrained
    if pretrained is None:
        pretrained = str(out / "pretrain")
        cmd = ["conmim-train", "--config", "tiny_demo", "--out", pretrained, "--progress", "false"]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        run_all([cmd], 1)
        result["pretrain_time"] = {"wall_s": round(time.perf_counter() - t0, 1),
                                   "cpu_s": round(_children_cpu() - cpu0, 1), "threads": 1}  # fmt: skip
    result["pretrain"] = pretrain_summary(Path(pretrained))
    commands, keys = [], []
    for seed in args.seeds:
        for kind, init in (("pretrained", pretrained), ("scratch", "none")):
            commands.append(finetune_command(init, seed, out / f"{kind}-{seed}"))
            keys.append((seed, kind))
    cpu0, t0 = _children_cpu(), time.perf_counter()
    walls = run_all(commands, args.jobs)
    total_wall, total_cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    load["after"] = os.getloadavg()
    runs = []
    for (seed, kind), cmd, wall in zip(keys, commands, walls):
        res = json.loads((out / f"{kind}-{seed}" / "eval_finetune.json").read_text())
        runs.append({"seed": seed, "init": kind, "command": " ".join(cmd), "wall_s": round(wall, 1)} | {
            k: res[k] for k in ("top1", "top5", "best_top1", "best_epoch", "epochs", "train_images")})  # fmt: skip
    by = {(r["seed"], r["init"]): r for r in runs}
    margins = {
        str(s): round(100 * (by[s, "pretrained"]["top1"] - by[s, "scratch"]["top1"]), 2) for s in args.seeds
    }
    result |= {
        "preset": PRESET, "runs": runs, "margin_top1_points": margins,
        "finetune_wall_s": round(total_wall, 1), "finetune_cpu_s": round(total_cpu, 1), "jobs": args.jobs,
        "threads_per_job": 1, "load_average_1_5_15": load, "device": device_name(torch.device("cpu")), "date": _dt.date.today().isoformat(), "commit": commit(), "versions": versions(),
    }  # fmt: skip
    print(f"{'seed':>4} {'init':>10} {'top-1':>7} {'top-5':>7} {'wall s':>7}")
    for r in runs:
        print(
            f"{r['seed']:>4} {r['init']:>10} {100 * r['top1']:6.2f}% {100 * r['top5']:6.2f}% {r['wall_s']:7.1f}"
        )
    print(
        f"pretrained - scratch, top-1 points: {margins}; fine-tuning took {total_wall:.0f} s wall, "
        f"{total_cpu:.0f} CPU-s (load average before {load['before'][0]:.1f}, after {load['after'][0]:.1f})"
    )
    if not args.no_save:
        path = RESULTS / f"finetune-demo-{device_slug(torch.device('cpu'))}-{result['date']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
