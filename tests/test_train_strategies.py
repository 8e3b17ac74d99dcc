"""conmim-train's parallel strategies and its k-NN monitor: `--strategy fsdp` against `--strategy ddp` on 2 gloo
ranks, an FSDP run killed and resumed, continued at another world size and back, its run folder exported,
activation checkpointing under either strategy, and `eval_every` writing the teacher's k-NN to metrics.jsonl."""

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from conmim import checkpoint as ckpt
from conmim import evaluate as E
from conmim import export as X
from conmim import train as T
from conmim.metrics import Meter
from conmim.models import build_encoder
from tests.conftest import dcp_tensors, tiny
from tests.test_scaleout import torchrun_cmd
from tests.test_train import assert_identical, checkpoint_step, kill_once_checkpointed

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(digits, out: Path, *extra: str, world: int = 2) -> list[str]:
    """conmim-train under torchrun on ``world`` gloo ranks: the tiny model on the 32 digits, one log per step."""
    cmd = torchrun_cmd(digits, out, "--log_every", "1", *extra)
    cmd[cmd.index("--nproc_per_node") + 1] = str(world)
    return cmd


def launch(digits, out: Path, *extra: str, world: int = 2) -> subprocess.CompletedProcess:
    """``command`` run to its end, which must be a success."""
    r = subprocess.run(
        command(digits, out, *extra, world=world), capture_output=True, text=True, timeout=600, env=ENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(state: dict) -> dict:
    """Parameters only: BatchNorm running statistics are each rank's own under FSDP (DDP broadcasts rank 0's)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


@pytest.fixture
def single_process_group():
    """An FSDP run on one process starts a one-rank process group: tear it down after the test."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


# 2 epochs of 2 optimizer steps, checkpointed after every step (all kept), each rank's images recorded
RUN = ("--epochs", "2", "--checkpoint_every", "1", "--keep_last", "4", "--record_samples", "true")


@pytest.fixture(scope="module")
def two_rank_runs(digits, tmp_path_factory) -> dict[str, Path]:
    """The same run (``RUN``) on 2 ranks under each strategy."""
    base = tmp_path_factory.mktemp("strategies")
    for strategy in ("ddp", "fsdp"):
        launch(digits, base / strategy, *RUN, "--strategy", strategy)
    return {s: base / s for s in ("ddp", "fsdp")}


# ------------------------------------------------------------------------------------------- FSDP on 2 ranks
@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_like_ddp(two_rank_runs):
    ddp, fsdp_run = two_rank_runs["ddp"], two_rank_runs["fsdp"]
    for run in (ddp, fsdp_run):  # one checkpoint format for both strategies
        assert [p.name for p in ckpt.checkpoints(run)] == [
            "ckpt-e0002-s00000004",
            "ckpt-e0001-s00000003",
            "ckpt-e0001-s00000002",
            "ckpt-e0000-s00000001",
        ]
        assert [m["epoch_end"] for m in ckpt.manifests(run)] == [True, False, True, False]
    want, got = losses(ddp), losses(fsdp_run)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:  # fp32 on both; only the gradient reduction order differs
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    sharded, replicated = (ckpt.read(ckpt.checkpoints(run)[0]) for run in (fsdp_run, ddp))
    assert sharded["step"] == replicated["step"] == 4 and sharded["epoch"] == replicated["epoch"] == 2
    for which, atol in (("student", 2e-4), ("teacher", 2e-5)):
        a, b = _weights(sharded[which]), _weights(replicated[which])
        assert a.keys() == b.keys()
        for k in b:
            # the final norm's bias has a zero true gradient (the head's BatchNorm removes any constant shift):
            # its gradient is rounding noise, which AdamW's normalisation turns into steps of up to lr that
            # differ with the reduction order; bounded by the 4 steps' lr (1e-3) instead, times the teacher's
            # 1 - momentum (at most 0.04 in tiny_demo) for the teacher
            tol = 4 * 1e-3 * (1 if which == "student" else 0.04) if k == "backbone.norm.bias" else atol
            torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=f"{which} {k}")
    # DDP compares the replicas at the end; FSDP's ranks hold different shards, so it does not
    assert (ddp / "rank_checksums.json").exists() and not (fsdp_run / "rank_checksums.json").exists()


@pytest.mark.slow
def test_a_killed_two_rank_fsdp_run_resumes_bit_for_bit(digits, two_rank_runs, tmp_path):
    """The machine dies (torchrun and both ranks SIGKILLed) after the checkpoint of step 1, mid-epoch, or later;
    the same command on 2 ranks resumes and ends with the uninterrupted run's checkpoint, bit for bit."""
    out = tmp_path / "run"
    cmd = command(digits, out, *RUN, "--strategy", "fsdp")
    killed_at = kill_once_checkpointed(cmd, lambda: ckpt.checkpoints(out), 1)
    assert 1 <= killed_at < 4, "the run must be killed in the middle"
    newest = ckpt.checkpoints(out)[0].name
    r = launch(digits, out, *RUN, "--strategy", "fsdp")
    assert f"resuming from {newest} (" in r.stderr and f"step {killed_at})" in r.stderr
    got, want = (dcp_tensors(ckpt.checkpoints(run)[0]) for run in (out, two_rank_runs["fsdp"]))
    student = _weights(ckpt.read(ckpt.checkpoints(out)[0])["student"])
    moments = {f"optimizer.state.{k}.{m}" for k in student for m in ("exp_avg", "exp_avg_sq")}
    assert moments <= want.keys()
    assert_identical(got, want)


@pytest.mark.slow
def test_export_reads_an_fsdp_run_folder(two_rank_runs, tmp_path):
    import timm
    from safetensors.torch import load_file

    run = two_rank_runs["fsdp"]
    assert X.main([str(run), "--out", str(tmp_path / "t.safetensors")]) == 0
    meta = json.loads((tmp_path / "t.safetensors.json").read_text())
    assert meta["step"] == 4
    weights = load_file(str(tmp_path / "t.safetensors"))
    teacher = ckpt.read(ckpt.checkpoints(run)[0])["teacher"]
    assert weights.keys() == {k.removeprefix("backbone.") for k in teacher if k.startswith("backbone.")}
    for k, v in weights.items():
        assert torch.equal(v, teacher[f"backbone.{k}"]), k
    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, **meta["kwargs"])
    model.load_state_dict(weights)
    evaluated, _ = E.load_backbone(str(run))  # conmim-eval's reader
    for k, v in weights.items():
        assert torch.equal(evaluated.state_dict()[k], v), k


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _read(out: Path, epoch: int, rank: int) -> list[list[int]]:
    """The images a rank read in an epoch, a list per micro-batch (``--record_samples``)."""
    lines = (out / f"samples-e{epoch:04d}-r{rank}.txt").read_text().splitlines()
    return [[int(i) for i in line.split()] for line in lines]


@pytest.mark.slow
def test_a_two_rank_fsdp_run_continues_on_one_rank_and_back_on_two(digits, two_rank_runs, tmp_path):
    """The uninterrupted 2-rank run's mid-epoch checkpoint of step 1 continued on 1 rank with accum_steps 2 (the
    same global batch), and that run's mid-epoch checkpoint of step 3 continued on 2 ranks: the step count, the LR
    and momentum schedules and the RNG streams go on exactly, each epoch reads every image once across the world
    sizes, and the losses follow the uninterrupted run's. Not bit for bit: the masks come from per-rank streams
    and the head's BatchNorm sees other micro-batches, so the steps on 1 rank see other masks and statistics."""
    whole = two_rank_runs["fsdp"]
    one, two = tmp_path / "one", tmp_path / "two"
    legs = [
        (whole, "ckpt-e0000-s00000001", one, 1, ("--accum_steps", "2")),
        (one, "ckpt-e0001-s00000003", two, 2, ()),
    ]
    for src, name, out, world, extra in legs:
        shutil.copytree(src / name, out / name)
        r = launch(digits, out, *RUN, "--strategy", "fsdp", *extra, world=world)
        assert f"resuming from {name} (" in r.stderr and f"step {checkpoint_step(out / name)})" in r.stderr
    want, uninterrupted = _metrics(whole), ckpt.read(ckpt.checkpoints(whole)[0])
    for out, steps in ((one, [2, 3, 4]), (two, [4])):
        got = _metrics(out)
        assert sorted(got) == steps
        for k in steps:
            assert [got[k][x] for x in ("epoch", "lr", "momentum")] == [
                want[k][x] for x in ("epoch", "lr", "momentum")
            ]
            # other masks: up to 0.26 apart here; a run that started again would be near step 1's loss
            assert got[k]["loss"] == pytest.approx(want[k]["loss"], abs=0.35), k
            assert got[k]["loss"] < want[1]["loss"] - 0.3, k
        final = ckpt.read(ckpt.checkpoints(out)[0])
        assert (final["step"], final["epoch"], final["batch"]) == (4, 2, 0)
        assert_identical(final["rng"], uninterrupted["rng"])
    # epoch 0: step 1 on 2 ranks, step 2 on 1 rank; epoch 1: step 3 on 1 rank, step 4 on 2 ranks
    epoch0 = [*_read(whole, 0, 0)[0], *_read(whole, 0, 1)[0], *itertools.chain(*_read(one, 0, 0))]
    epoch1 = [*itertools.chain(*_read(one, 1, 0)[:2]), *_read(two, 1, 0)[0], *_read(two, 1, 1)[0]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))
    # back on 2 ranks mid-epoch, each rank reads the batch it read in the uninterrupted run
    assert [_read(two, 1, r) for r in (0, 1)] == [_read(whole, 1, r)[1:] for r in (0, 1)]


# ----------------------------------------------------------------------------------------- in one process
def test_fsdp_on_one_process_saves_and_resumes(digits, tmp_path, single_process_group):
    out = tmp_path / "run"
    T.train(tiny(digits, out, strategy="fsdp", epochs=1, max_steps=2, checkpoint_every=1))
    assert [p.name for p in ckpt.checkpoints(out)] == ["ckpt-e0000-s00000002", "ckpt-e0000-s00000001"]
    state = ckpt.read(ckpt.checkpoints(out)[0])
    assert (state["step"], state["batch"], state["images"]) == (2, 2, 16)
    summary = T.train(tiny(digits, out, strategy="fsdp", epochs=1))
    assert summary["steps"] == 4 and sorted(losses(out)) == [1, 2, 3, 4]
    assert ckpt.checkpoints(out)[0].name == "ckpt-e0001-s00000004"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grad_checkpointing_recomputes_the_blocks_under_either_strategy(
    digits, tmp_path, strategy, single_process_group
):
    run = T.build_run(
        tiny(digits, tmp_path / "run", strategy=strategy, grad_checkpointing=True),
        0,
        1,
        torch.device("cpu"),
        tmp_path / "run",
    )
    calls = []
    run.parallel.student.backbone.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    run.loader.set_epoch(0)
    xs, xt, mask = next(iter(run.loader))
    before = [p.detach().clone() for p in run.parallel.teacher.parameters()]
    T.train_step(run, T.RunState(), [(xs, xt, mask)], Meter(run.device))
    assert len(calls) == 2  # the forward, and its recomputation in the backward
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, run.parallel.teacher.parameters()))


def test_the_step_benchmark_runs_both_strategies(digits, tmp_path, single_process_group):
    from benchmarks import bench_fsdp_step as B

    small = {
        "data": str(digits),
        "out": str(tmp_path / "run"),
        "batch_size": 8,
        "head_hidden": 64,
        "head_out": 32,
    }
    got = B.worker(tmp_path / "times.json", small, warmup=1, steps=2)
    assert json.loads((tmp_path / "times.json").read_text()) == got
    assert list(got) == ["ddp", "fsdp"] and all(len(t) == 2 and min(t) > 0 for t in got.values())
    assert not dist.is_initialized()  # the one-rank group FSDP started is torn down


# --------------------------------------------------------------------------------------------- k-NN monitor
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_eval_every_logs_the_teachers_knn(
    digits, labelled_digits, tmp_path, capsys, strategy, single_process_group
):
    from conmim.evaluate import knn_monitor

    out = tmp_path / "run"
    T.train(tiny(digits, out, strategy=strategy, epochs=3, eval_every=2, eval_data=str(labelled_digits)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in knn] == [(2, 8)]
    assert knn[0].keys() == {"epoch", "step", "knn_top1", "knn_data"} and knn[0]["knn_data"] == str(
        labelled_digits
    )
    base = [r for r in rows if "knn_top1_random_init" in r]
    assert [(r["epoch"], r["step"]) for r in base] == [(0, 0)], (
        "the baseline is logged once, before the first step"
    )
    gain = 100 * (knn[0]["knn_top1"] - base[0]["knn_top1_random_init"])
    err = capsys.readouterr().err
    where = f"teacher k-NN top-1 on {labelled_digits}"
    assert f"random initialisation: {where} {100 * base[0]['knn_top1_random_init']:.2f}%" in err
    assert (
        f"2 epochs done, step 8: {where} {100 * knn[0]['knn_top1']:.2f}% "
        f"({gain:+.2f} points over random initialisation)" in err
    )
    # the baseline is the teacher before any step: the student as initialised from the run's seed
    torch.manual_seed(0)
    init = build_encoder("vit_tiny_demo", 64, 32, img_size=32, patch_size=4)
    want = knn_monitor(init, data=str(labelled_digits))
    assert base[0]["knn_top1_random_init"] == pytest.approx(want, abs=1e-6)
    # the value is the k-NN of the teacher saved at that epoch's end
    saved = ckpt.read(next(p for p in ckpt.checkpoints(out) if p.name.startswith("ckpt-e0002")))["teacher"]
    model = build_encoder("vit_tiny_demo", 64, 32, img_size=32, patch_size=4)
    model.load_state_dict(saved)
    assert knn[0]["knn_top1"] == pytest.approx(knn_monitor(model, data=str(labelled_digits)), abs=1e-6)
    # resumed for one more epoch: no second baseline, and the new value still states its gain over the first
    T.train(tiny(digits, out, strategy=strategy, epochs=4, eval_every=2, eval_data=str(labelled_digits)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1_random_init" in r] == [0]
    last = [r for r in rows if "knn_top1" in r][-1]
    assert (last["epoch"], last["step"]) == (4, 16)
    gain = 100 * (last["knn_top1"] - base[0]["knn_top1_random_init"])
    assert f"({gain:+.2f} points over random initialisation)" in capsys.readouterr().err


def test_eval_data_is_checked_before_anything_is_written(digits, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="must hold train/ and val/"):
        T.train(tiny(digits, out, eval_every=1, eval_data=str(digits)))
    assert not out.exists()


def test_bad_strategy_is_refused():
    from conmim import config as cfgmod

    with pytest.raises(cfgmod.ConfigError, match="'strategy' must be one of \\('ddp', 'fsdp'\\)"):
        cfgmod.resolve(cfgmod.TrainConfig, "tiny_demo", {"data": "x", "strategy": "zero3"})


def test_a_ddp_run_continues_under_fsdp(digits, tmp_path, capsys, single_process_group):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, max_steps=2))
    T.train(tiny(digits, out, epochs=1, strategy="fsdp"))
    assert "resuming from ckpt-e0000-s00000002" in capsys.readouterr().err
    assert sorted(losses(out)) == [1, 2, 3, 4] and ckpt.read_latest(out)["step"] == 4


@pytest.mark.parametrize(
    ("batch_size", "accum", "images", "want"),
    [
        (8, 1, 16, (0, 2)),  # the same layout: the same batch
        (8, 2, 16, (0, 2)),  # one rank doing two ranks' work with accum_steps 2
        (8, 2, 24, (0, 2)),  # mid-step at this layout: back to the step's start (8 images read again)
    ],
)
def test_resume_position_is_counted_in_images(digits, tmp_path, monkeypatch, batch_size, accum, images, want):
    cfg = tiny(digits, tmp_path / "run", batch_size=batch_size, accum_steps=accum)
    run = T.build_run(cfg, 0, 1, torch.device("cpu"), tmp_path / "run")
    saved = {**T.RunState(batch=99, step=3).state_dict(), "images": images, "scaler": run.scaler.state_dict()}
    monkeypatch.setattr(run.checkpoints, "load_latest", lambda parts: saved)
    state = T.RunState()
    T.restore(run, state)
    assert (state.epoch, state.batch, state.step) == (*want, 3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_steps_under_low_precision(digits, tmp_path, precision, single_process_group):
    cfg = tiny(digits, tmp_path / "run", strategy="fsdp", precision=precision)
    run = T.build_run(cfg, 0, 1, torch.device("cpu"), tmp_path / "run")
    # fp16: the sharded gradient scaler, whose overflow flag the fused AdamW cannot take (see Sharded)
    assert isinstance(run.scaler, ShardedGradScaler) and run.scaler.is_enabled() == (precision == "fp16")
    assert run.opt.defaults["fused"] == (precision == "bf16")
    before = [p.detach().to_local().clone() for p in run.parallel.student.parameters()]
    run.loader.set_epoch(0)
    state, meter = T.RunState(), Meter(run.device)
    for batch in itertools.islice(run.loader, 3):
        T.train_step(run, state, [batch], meter)
    assert state.step == 3 and meter.sums[1] == 3  # three finite losses
    assert all(torch.isfinite(p.to_local()).all() for p in run.parallel.student.parameters())
    assert any(
        not torch.equal(a, p.detach().to_local()) for a, p in zip(before, run.parallel.student.parameters())
    )
