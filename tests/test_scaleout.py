"""torchrun/DDP on CPU (gloo), timm export round trip, k-NN and linear-probe evaluation."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conmim import checkpoint as ckpt
from conmim import evaluate as E
from conmim import export as X
from conmim import train as T
from conmim.metrics import Meter
from tests.conftest import tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(digits, out, *extra) -> list[str]:
    """torchrun with 2 CPU processes (gloo) training the tiny model on the 32 digits."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "conmim.train", "--config", "tiny_demo", "--data", str(digits),
            "--out", str(out), "--batch_size", "8", "--num_workers", "0", "--loader", "torch", "--progress", "false",
            "--head_hidden", "64", "--head_out", "32", "--eval_every", "0", *extra]  # fmt: skip


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical_and_covers_the_dataset(digits, tmp_path):
    out = tmp_path / "ddp"
    cmd = torchrun_cmd(digits, out, "--epochs", "2", "--record_samples", "true")
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    for epoch in (0, 1):
        seen = [
            [int(i) for i in (out / f"samples-e{epoch:04d}-r{rank}.txt").read_text().split()]
            for rank in (0, 1)
        ]
        assert len(seen[0]) == len(seen[1]) == 16
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(32))
    assert len(list(out.glob("metrics.jsonl"))) == 1  # rank 0 alone logs and checkpoints


def _accumulated_steps(rank: int, port: int, digits: str, accum: int, result: str) -> None:
    """One rank of a 2-rank gloo run: two optimizer steps of train_step on a fixed global batch of 16 (8 per
    rank, in ``accum`` micro-batches); rank 0 saves the student and the number of DDP gradient all-reduces."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        cfg = tiny(digits, Path(result).parent / f"unused-{accum}", accum_steps=accum, batch_size=8 // accum)
        run = T.build_run(cfg, rank, 2, torch.device("cpu"), Path(cfg.out))
        # batch statistics would make 4 micro-batches differ from one batch: normalise with running statistics
        run.parallel.student.eval()
        run.parallel.teacher.eval()
        reduces = [0]

        def counting(_, bucket):
            reduces[0] += 1
            return allreduce_hook(None, bucket)

        run.parallel.ddp.register_comm_hook(None, counting)
        grads = []  # the gradients each optimizer step applies
        run.opt.register_step_pre_hook(
            lambda opt, *_: grads.append([p.grad.clone() for p in run.parallel.student.parameters()])
        )
        g = torch.Generator().manual_seed(1)
        xs, xt = torch.randn(2, 16, 3, 32, 32, generator=g), torch.randn(2, 16, 3, 32, 32, generator=g)
        order = torch.rand(2, 16, 64, generator=g).argsort(-1)
        mask = order < 24  # the same number of masked patches in every image: a mean of micro-batch means
        state, meter = T.RunState(), Meter(run.device)
        mine = slice(8 * rank, 8 * rank + 8)
        for step in range(2):
            parts = zip(*(t[step, mine].chunk(accum) for t in (xs, xt, mask)))
            T.train_step(run, state, parts, meter)
        if rank == 0:
            torch.save(
                {"student": run.parallel.student.state_dict(), "reduces": reduces[0], "grads": grads}, result
            )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("accum", [4])
def test_accumulation_all_reduces_once_per_step_and_matches_one_big_batch(digits, tmp_path, accum):
    import torch.multiprocessing as mp

    results = {}
    for n in (1, accum):
        results[n] = str(tmp_path / f"accum{n}.pt")
        mp.spawn(_accumulated_steps, args=(_free_port(), str(digits), n, results[n]), nprocs=2, join=True)
    one, many = (torch.load(results[n], weights_only=True) for n in (1, accum))
    assert one["reduces"] == many["reduces"] == 2  # one all-reduce (one bucket) per optimizer step
    # the first step's averaged gradient, from identical weights, agrees to fp32 rounding (of each tensor's scale)
    for ga, gb in zip(one["grads"][0], many["grads"][0], strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5 * float(ga.abs().max()))
    # AdamW divides by sqrt(v): where a gradient is near its eps, the last bits of the sum move an update by up to
    # a few % of lr (1e-3), hence the weights' absolute tolerance
    assert one["student"].keys() == many["student"].keys()
    for k, v in one["student"].items():
        torch.testing.assert_close(many["student"][k], v, rtol=1e-4, atol=5e-5, msg=k)


def test_export_loads_in_timm(digits, tmp_path):
    import timm

    run = tmp_path / "run"
    T.train(tiny(digits, run, epochs=1))
    path, meta = X.export(run, tmp_path / "teacher.safetensors")
    from safetensors.torch import load_file

    weights = load_file(str(path))
    assert not any(
        k.startswith(("backbone.", "module.", "_orig_mod.", "head.", "mask_token")) for k in weights
    )
    model = timm.create_model(
        meta["timm_model"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=10,
        **meta["kwargs"],
    )
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    state = ckpt.read(ckpt.checkpoints(run)[0])
    assert torch.equal(
        weights["blocks.0.attn.qkv.weight"], state["teacher"]["backbone.blocks.0.attn.qkv.weight"]
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert X.main([str(run), "--out", str(tmp_path / "s.safetensors"), "--which", "student"]) == 0
    assert X.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_export_strips_wrapper_prefixes():
    sd = {
        "module._orig_mod.backbone.cls_token": torch.zeros(1),
        "module.head.net.0.weight": torch.zeros(1),
        "mask_token": torch.zeros(1),
    }
    assert list(X.backbone_state(sd)) == ["cls_token"]
    with pytest.raises(ValueError, match="no backbone"):
        X.backbone_state({"head.w": torch.zeros(1)})


def test_knn_and_linear_eval_on_digits(digits, labelled_digits, tmp_path):
    run = tmp_path / "run"
    T.train(tiny(digits, run, epochs=1))
    data = labelled_digits
    knn = E.evaluate("knn", str(run), str(data))
    lin = E.evaluate("linear", str(run), str(data))
    assert 0.0 <= knn <= 1.0 and 0.0 <= lin <= 1.0
    assert E.main(["knn", str(run), "--data", str(data), "--compare-random"]) == 0
    result = json.loads((run / "eval_knn_teacher.json").read_text())
    assert result["top1"] == pytest.approx(knn) and "top1_random_init" in result
    assert E.main(["knn", str(run), "--data", str(tmp_path / "nope")]) == 2


def test_knn_vote_is_temperature_weighted():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    val = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0], [1.0, 0.05]]), dim=-1)
    assert E.knn_top1(train, labels, val, torch.tensor([1, 0]), k=3) == 1.0


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(x) for x in text]
    return kids


@pytest.mark.slow
def test_a_dying_rank_stops_torchrun_and_the_same_command_resumes(digits, tmp_path):
    import signal
    import time

    out = tmp_path / "ddp"
    cmd = torchrun_cmd(digits, out, "--epochs", "15", "--checkpoint_every", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.checkpoints(out):
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    try:
        proc.wait(timeout=120)  # torchrun notices the dead rank and stops the other: no hang
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun did not stop after a rank died")
    assert proc.returncode != 0
    again = torchrun_cmd(
        digits, out, "--epochs", "15", "--checkpoint_every", "2"
    )  # the same, on a fresh port
    done = subprocess.run(again, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    state = ckpt.read(ckpt.checkpoints(out)[0])
    assert state["step"] == 30
