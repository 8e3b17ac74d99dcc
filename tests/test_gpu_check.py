"""benchmarks/gpu_check.sh's plumbing, proved on the CPU by its --dry-run: stage order, time caps (a hung stage is
stopped at its cap and the run goes on), and the files written to $OUT after each stage."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)


def dry_run(out: Path, timeout: float, **env) -> tuple[int, list[dict], str]:
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **{k: str(v) for k, v in env.items()})
    full.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    return proc.returncode, stages, proc.stdout + proc.stderr


@pytest.mark.slow  # ~20 s: the stages import torch
def test_a_hung_stage_is_stopped_at_its_cap_and_the_run_goes_on(tmp_path):
    rc, stages, log = dry_run(
        tmp_path, 120, STAGES="build sanitize", DRY_HANG="sanitize", CAP_SANITIZE=2, GPU_CHECK_BUDGET=100
    )
    assert [s["stage"] for s in stages] == ["build", "sanitize"], log
    build, sanitize = stages
    assert build["rc"] == 0 and build["dry_run"] is True
    assert sanitize["cap_s"] == 2 and sanitize["rc"] == 124 and sanitize["seconds"] <= 4, sanitize
    assert rc == 1, "a stage that ran past its cap must fail the run"
    assert "status 1" in (tmp_path / "summary.txt").read_text()


@pytest.mark.slow
def test_caps_never_pass_the_budget(tmp_path):
    # a 6 s budget: the build's 240 s cap shrinks to what is left
    rc, stages, log = dry_run(tmp_path, 120, STAGES="build", GPU_CHECK_BUDGET=6)
    assert rc == 0, log
    assert stages[0]["stage"] == "build" and stages[0]["cap_s"] <= 6


@pytest.mark.slow
def test_full_dry_run_order_caps_and_files(tmp_path):
    rc, stages, log = dry_run(tmp_path, 590)
    names = [s["stage"] for s in stages]
    # the build runs in the background during the Triton smoke and is recorded when the CUDA stage waits for it
    assert names == ["preflight", "triton", "build", "cuda", "sanitize", "tests", "step"], log
    assert rc == 0, log
    defaults = {
        "preflight": 30,
        "build": 240,
        "triton": 150,
        "cuda": 60,
        "sanitize": 75,
        "tests": 150,
        "step": 75,
    }
    for s in stages:
        assert 1 <= s["cap_s"] <= defaults[s["stage"]] and s["seconds"] <= s["cap_s"] + 5, s
        assert s["rc"] == 0 and s["dry_run"] is True, s
    for name in (
        "preflight.log",
        "build.log",
        "info.log",
        "triton.log",
        "cuda.log",
        "sanitize.log",
        "step.log",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    for backend in ("triton", "cuda"):
        smoke = json.loads((tmp_path / f"smoke_{backend}.json").read_text())
        # bf16, fp32 with positive_index, fp16 past fp16's range, the EMA
        assert smoke["dry_run"] and len(smoke["cases"]) == 4, smoke
        for case in smoke["cases"]:
            assert case["ok"] and case["error"] is None and case["median_s"] > 0 and case["kernel_s"], case
    records = [json.loads(x) for x in (tmp_path / "cuda_tests.jsonl").read_text().splitlines()]
    assert records and all(r["outcome"] == "skipped" for r in records)  # no GPU here
    suite = ET.parse(tmp_path / "cuda_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == len(records) == int(suite.get("skipped"))
