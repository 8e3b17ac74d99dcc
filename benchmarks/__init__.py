"""conmim benchmark suite: one harness (benchmarks.harness), one script per op, recorded results in results/."""
