"""Step time of the tiny demo (``--config tiny_demo``: the tiny ViT on 32 px digits, the preset's batch per rank, fp32) on
the CPU under both strategies, ``ddp`` and ``fsdp``, on 1 and 2 gloo ranks.

``python -m benchmarks.bench_fsdp_step [--worlds 1,2] [--threads 1] [--steps 20] [--warmup 3]`` launches torchrun
once per number of ranks, each rank with ``threads`` torch threads (1 by default: on a machine shared with other
jobs, a rank of several threads waits at every parallel region for its descheduled threads: 2 threads on 1 rank
gave steps of 1.4 to 5.4 s in one run here, where with one thread per rank the middle half of the steps stays
within about 10% of the median). Every rank builds one run per strategy as conmim-train does
(``train.build_run``: model, strategy, fused AdamW, loader on the bundled MNIST digits), loads ``warmup + steps``
batches first (the data pipeline is not timed), then runs the strategies' ``train.train_step`` (forward,
backward, gradient reduction, clip, AdamW, EMA) in turn, ddp fsdp ddp fsdp ..., on the same batches, so that
drift and the machine's other load hit both alike (the harness's interleaving). A step is timed with
``perf_counter`` from a barrier to its return; the slowest rank's time counts. Reported per case: the median over
the timed steps and their first and third quartiles, images/s = global batch (batch x ranks) / that median, and for
fsdp the median of its step-by-step ratio to ddp; with the load average around each launch. Writes
benchmarks/results/fsdp-step-<cpu>.json (labelled CPU).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import harness
from benchmarks.bench_fsdp_memory import ROOT, _free_port

CONFIG = "tiny_demo"
STRATEGIES = ("ddp", "fsdp")


def worker(out: Path, overrides: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """One rank (alone, or under torchrun): ``warmup + steps`` training steps of ``CONFIG`` with ``overrides``
    under each strategy, interleaved; returns (and rank 0 writes to ``out`` as JSON) each strategy's timed steps'
    seconds, each the slowest rank's."""
    from conmim import config, parallel, train
    from conmim.metrics import Meter

    rank, world, _ = parallel.dist_env()
    if world > 1:
        dist.init_process_group("gloo")
    runs = {}
    for strategy in STRATEGIES:
        cfg = config.resolve(
            config.TrainConfig,
            CONFIG,
            {"num_workers": 0, "loader": "torch", "progress": False, **overrides, "strategy": strategy},
        )
        runs[strategy] = train.build_run(cfg, rank, world, torch.device("cpu"), Path(cfg.out))
    loader = runs["ddp"].loader  # the same configuration, so the same batches for both
    loader.set_epoch(0)
    batches = list(itertools.islice(loader, warmup + steps))
    if len(batches) < warmup + steps:
        raise ValueError(f"steps: {warmup} + {steps} steps need as many batches; an epoch has {len(batches)}")
    states = {s: (train.RunState(), Meter(torch.device("cpu"))) for s in STRATEGIES}
    times = torch.zeros(len(STRATEGIES), warmup + steps, dtype=torch.float64)
    for i, batch in enumerate(batches):
        for j, strategy in enumerate(STRATEGIES):
            if world > 1:
                dist.barrier()
            state, meter = states[strategy]
            t0 = time.perf_counter()
            train.train_step(runs[strategy], state, [batch], meter)
            times[j, i] = time.perf_counter() - t0
    times = times[:, warmup:].contiguous()
    if world > 1:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    got = {s: times[j].tolist() for j, s in enumerate(STRATEGIES)}
    if rank == 0:
        out.write_text(json.dumps(got))
    if dist.is_initialized():
        dist.destroy_process_group()
    return got


def launch(world: int, threads: int, warmup: int, steps: int) -> dict[str, list[float]]:
    """``worker`` under torchrun on ``world`` CPU ranks of ``threads`` torch threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "benchmarks.bench_fsdp_step", "--worker",
               str(out), "--warmup", str(warmup), "--steps", str(steps), "--run_dir", str(Path(tmp) / "run")]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{world} ranks failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_fsdp_step", description=__doc__.split("\n")[0]
    )
    p.add_argument("--worlds", default="1,2", help="comma-separated numbers of ranks, one launch each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=20, help="timed steps per strategy")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per strategy first")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run_dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.threads < 1:
        p.error(
            f"--steps and --threads must be at least 1 and --warmup at least 0, got {a.steps}, {a.threads} "
            f"and {a.warmup}"
        )
    if a.worker is not None:
        worker(a.worker, {"out": a.run_dir}, a.warmup, a.steps)
        return 0
    from conmim import config

    batch = config.resolve(config.TrainConfig, CONFIG, {}).batch_size
    cores = os.cpu_count() or 1
    cpu = torch.device("cpu")
    torch.set_num_threads(a.threads)  # as in the ranks, for the device's description
    print(f"{CONFIG} on {harness.device_name(cpu)}: {a.warmup} + {a.steps} steps per strategy", flush=True)
    records, rows = [], []
    for world in (int(w) for w in a.worlds.split(",")):
        threads = a.threads
        before = os.getloadavg()[0]
        got = launch(world, threads, a.warmup, a.steps)
        load = [before, os.getloadavg()[0]]
        for strategy in STRATEGIES:
            median = statistics.median(got[strategy])
            quartiles = statistics.quantiles(got[strategy], n=4)
            ratios = [d / t for d, t in zip(got["ddp"], got[strategy])]
            records.append({
                "strategy": strategy, "ranks": world, "threads_per_rank": threads, "global_batch": batch * world,
                "median_step_s": median, "quartiles_s": [quartiles[0], quartiles[2]], "images_per_s": batch * world / median,
                "speed_vs_ddp": statistics.median(ratios), "load_average_1min_before_after": load,
                "step_times_s": got[strategy],
            })  # fmt: skip
            rows.append([strategy, str(world), str(threads), harness.fmt_time(median),
                         f"{batch * world / median:.1f}", f"{statistics.median(ratios):.2f}x",
                         f"{load[0]:.1f} / {load[1]:.1f}"])  # fmt: skip
    print(
        harness.table(
            rows,
            ["strategy", "ranks", "threads/rank", "median step", "images/s", "vs ddp", "load before/after"],
        )
    )
    if not a.no_save:
        path = harness.RESULTS / f"fsdp-step-{harness.device_slug(cpu)}.json"
        payload = {
            "label": "CPU",
            "method": f"{CONFIG} ({batch} images per rank, fp32, gloo), conmim.train.build_run and train_step as "
            f"conmim-train runs them, one torchrun launch per number of ranks, {a.threads} torch thread(s) per rank; "
            f"in it the strategies alternate step by step on the same batches (loaded beforehand), "
            f"{a.warmup} warm-up steps each, then {a.steps} timed; a step is timed from a barrier to its return, "
            "the slowest rank counts; median over the timed steps (quartiles_s: the first and third quartiles); images/s = global batch / median; speed_vs_ddp "
            "= median of the step-by-step ratio ddp time / this time",
            "device": harness.device_name(cpu),
            "cores": cores,
            "load": "measured on a machine shared with other jobs, at nice "
            f"{os.nice(0)}: the 1-minute load average before and after each launch is in each case",
            "date": _dt.date.today().isoformat(),
            "commit": harness.commit(),
            "versions": harness.versions(),
            "cases": records,
        }
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
