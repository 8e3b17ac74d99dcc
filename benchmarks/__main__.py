"""Benchmarks of the fused kernels against the reference formulations; nothing here is asserted by the tests.

  python -m benchmarks [--suite quick|full] [--ops loss,ema,step,data] [--device cpu|cuda]
      time the suite and write benchmarks/results/<device>-<date>.json
  python -m benchmarks report [--check]
      regenerate docs/performance.md's measured tables (and the plots) from the committed results
  python -m benchmarks static [--docs]
      the sm_90 static profile of every GPU kernel: compiled, not run
  python -m benchmarks mutate [--only NAMES] [--list]
      plant bugs in the GPU kernels one at a time and report how many the CPU tests kill

From any directory: ``conmim-bench ...`` (or ``python -m conmim.bench ...``) runs the same commands in the
checkout the package was installed from. Each sub-command takes --help.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    # torch and the benchmark modules are imported after the arguments are parsed: --help answers at once
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from benchmarks import report

        return report.main(argv[1:])
    if argv[:1] == ["static"]:
        from benchmarks import static

        return static.main(argv[1:])
    if argv[:1] == ["mutate"]:
        from benchmarks import mutate

        return mutate.main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results record the device, versions, commit, shapes, medians, spreads, peak memory and each\n"
        "result's fraction of the machine's floor (bandwidth and matmul rate measured in the same run);\n"
        "benchmarks/NOTES.md explains the numbers.",
    )
    p.add_argument(
        "--suite",
        choices=("quick", "full"),
        default="quick",
        help="quick: a few shapes per op, 7 rounds, the torch.compile baseline on the first shape only (CI runs "
        "it; minutes on a CPU); full: every shape of the grid (N up to 3136, d up to 1024), 15 rounds, the "
        "torch.compile baseline everywhere (default: quick)",
    )
    p.add_argument(
        "--ops",
        default="loss,ema,step,data",
        help="comma-separated subset of: loss, ema, step (a training step), data; run in that order",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to run: cpu (the C++ kernels against the references, fp32) or cuda (Triton and CUDA "
        "kernels, bf16; needs a GPU). Default: cuda when torch sees a GPU, else cpu",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per case (default: 7 quick, 15 full)"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-save", action="store_true", help="print only; write no results file")
    args = p.parse_args(argv)
    import torch

    from benchmarks import bench_data, bench_ema, bench_patch_contrast, bench_train_step, harness

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    unknown = ops - {"loss", "ema", "data", "step"}
    if unknown:
        p.error(f"--ops: unknown op(s) {sorted(unknown)}; expected some of loss, ema, data, step")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible to torch")
    device = torch.device(args.device)
    rounds = args.rounds or (7 if args.suite == "quick" else 15)
    t0 = time.perf_counter()
    print(f"device: {harness.device_name(device)}; suite {args.suite}; {rounds} rounds", flush=True)
    ceil = harness.ceilings(device)
    print(
        f"measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), in-place add "
        f"{ceil['add_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"matmul {ceil['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({ceil['matmul_dtype']})",
        flush=True,
    )
    results: dict = {"ceilings": ceil, "patch_contrast": [], "ema": [], "data": [], "train_step": []}

    def save_so_far() -> None:
        # after every op, so a run cut short (a timeout, a crash in a later op) keeps what it measured
        if not args.no_save:
            harness.save(results, device, args.suite)

    if "loss" in ops:
        print("\npatch-contrast loss", flush=True)
        results["patch_contrast"] = bench_patch_contrast.run(
            args.suite, device, ceil, rounds, with_compile=not args.no_compile
        )
        print(bench_patch_contrast.render(results["patch_contrast"]), flush=True)
        save_so_far()
    if "ema" in ops:
        print("\nEMA update", flush=True)
        results["ema"] = bench_ema.run(args.suite, device, ceil, rounds)
        print(bench_ema.render(results["ema"]), flush=True)
        save_so_far()
    if "step" in ops:
        print("\nConMIM training step", flush=True)
        results["train_step"] = bench_train_step.run(args.suite, device, ceil, rounds)
        print(bench_train_step.render(results["train_step"]), flush=True)
        save_so_far()
    if "data" in ops:
        print("\ntwo-view data pipeline (224 px, block masks)", flush=True)
        results["data"] = bench_data.run(args.suite, device, ceil, rounds)
        print(bench_data.render(results["data"]), flush=True)
        save_so_far()
    if not args.no_save:
        print(f"\nwrote {harness.save(results, device, args.suite)}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
