"""conmim-train: learning on a fixed batch, kill-and-resume, bad input, config round-trip, logs, checkpoints."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conmim import checkpoint as ckpt
from conmim import config as cfgmod
from conmim import optim
from conmim import train as T
from tests.conftest import dcp_tensors, tiny
from tests.test_scaleout import _children


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "conmim.train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_training_lowers_the_loss_on_a_fixed_batch(digits, tmp_path):
    cfg = tiny(digits, tmp_path / "run", batch_size=32, epochs=12, perturb=False, lr=2e-3)
    T.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.3, losses
    for key in ("loss", "lr", "momentum", "images_per_s", "data_wait_fraction", "step", "epoch"):
        assert key in rows[-1]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved == dataclasses.asdict(cfg)  # the resolved configuration, round-tripped


def test_config_file_round_trip_and_overrides(tmp_path):
    cfg = cfgmod.resolve(cfgmod.TrainConfig, "vit_b", {"data": "/x", "lr": 1e-4})
    path = tmp_path / "c.yaml"
    cfgmod.dump(cfg, path)
    assert cfgmod.resolve(cfgmod.TrainConfig, str(path)) == cfg
    assert cfg.model == "vit_base_patch16_224" and cfg.lr == 1e-4 and cfg.epochs == 800
    argv = ["--config", "vit_b", "--data", "/x", "--lr", "3e-4", "--compile=true", "--out", "runs/a"]
    args = vars(T.parser().parse_args(argv))
    parsed = cfgmod.resolve(cfgmod.TrainConfig, args.pop("config"), args)
    assert (parsed.lr, parsed.compile, parsed.out, parsed.epochs) == (3e-4, True, "runs/a", 800)


def checkpoint_step(path: Path) -> int:
    """The optimizer step in a checkpoint's name, ckpt-e<epoch>-s<step>."""
    return int(path.name.split("-s")[1])


def kill_once_checkpointed(cmd: list[str], found, at_least: int) -> int:
    """Start ``cmd`` (conmim-train, alone or under torchrun), and SIGKILL it and its children (torchrun's
    ranks, each in a session of its own) as soon as ``found()`` lists a checkpoint of step ``at_least`` or
    later: the machine dies. Returns the step of the newest complete checkpoint left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not any(checkpoint_step(p) >= at_least for p in found()):
        time.sleep(0.05)
    for pid in [*_children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    return max(checkpoint_step(p) for p in found())


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Nested dicts, lists and tuples of tensors and plain values equal bit for bit (tensors: same dtype, shape
    and values)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(digits, tmp_path):
    """SIGKILLed after its step-5 checkpoint or later and started again, the run ends with the checkpoint of
    the uninterrupted one, bit for bit: weights, optimizer state, run state and RNG states."""
    args = [
        "--config",
        "tiny_demo",
        "--eval_every",
        "0",
        "--data",
        str(digits),
        "--batch_size",
        "8",
        "--epochs",
        "3",
        "--num_workers",
        "0",
        "--loader",
        "torch",
        "--progress",
        "false",
        "--head_hidden",
        "64",
        "--head_out",
        "32",
        "--checkpoint_every",
        "2",
        "--keep_last",
        "20",
        "--warmup_epochs",
        "0.5",
    ]
    env = {"OMP_NUM_THREADS": "1"}
    ref = cli(*args, "--out", str(tmp_path / "a"), env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "conmim.train", *args, "--out", str(out)]
    killed_at = kill_once_checkpointed(cmd, lambda: ckpt.checkpoints(out), 5)
    assert 5 <= killed_at < 12, "the run must be killed in the middle"
    done = cli(*args, "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    a, b = (ckpt.checkpoints(run)[0] for run in (tmp_path / "a", out))
    assert a.name == b.name == "ckpt-e0003-s00000012"
    assert_identical(dcp_tensors(b), dcp_tensors(a))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(digits, tmp_path):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=2, checkpoint_every=1, keep_last=10))
    newest = ckpt.checkpoints(out)[0]
    data = newest / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])  # truncated
    messages = []
    state = ckpt.read_latest(out, messages.append)
    assert state is not None and state["step"] < checkpoint_step(newest)
    assert "is not used" in messages[0] and newest.name in messages[0] and "__0_0.distcp" in messages[0]


def test_nonfinite_losses_skip_then_stop(digits, tmp_path, monkeypatch):
    from conmim import loss as loss_mod

    monkeypatch.setattr(
        loss_mod.FusedPatchContrastLoss, "forward", lambda self, s, t, m, p=None: s.sum() * float("nan")
    )
    with pytest.raises(T.TrainingError, match="3 non-finite losses in a row"):
        T.train(tiny(digits, tmp_path / "run", max_bad_steps=3))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_streak"] for r in rows] == [1, 2, 3]
    assert all(r["nonfinite_losses"] == 1 and "loss" not in r for r in rows)


@pytest.mark.parametrize(
    "args,words",
    [
        (["--data", "/nonexistent/folder"], "does not exist"),
        (["--model", "vit_gigantic"], "config key 'model' must be one of"),
        (["--learning_rate", "1"], "unrecognized arguments: --learning_rate 1"),
        (["--precision", "fp8"], "'precision' must be one of"),
        (["--batch_size", "many"], "'batch_size' must be a number"),
        (["--config", "nope.yaml"], "no such file and not a preset"),
    ],
)
def test_bad_input_is_one_line_error(digits, tmp_path, args, words):
    base = [
        "--config",
        "tiny_demo",
        "--data",
        str(digits),
        "--out",
        str(tmp_path / "r"),
        "--progress",
        "false",
    ]
    if args[0] == "--config":
        base = base[2:]
    r = cli(*base, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("conmim-train: error:")]
    assert len(last) == 1 and words in last[0], r.stderr[-2000:]
    assert not list((tmp_path / "r").glob("ckpt-*"))


def test_empty_folder_and_incompatible_run_folder(digits, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("--config", "tiny_demo", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "holds no usable" in r.stderr
    T.train(tiny(digits, tmp_path / "run", epochs=1))
    with pytest.raises(
        T.TrainingError, match=r"holds checkpoints of another arch \(head_out: 32 there vs 16 here\)"
    ):
        T.train(tiny(digits, tmp_path / "run", epochs=1, head_out=16))


def test_lr_schedule_and_no_decay_groups():
    assert optim.lr_at(0, 100, 10, 1e-3, 1e-5) == 0.0
    assert optim.lr_at(5, 100, 10, 1e-3, 1e-5) == pytest.approx(5e-4)
    assert optim.lr_at(10, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert optim.lr_at(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)
    from conmim.models import build_encoder

    model = build_encoder("vit_tiny_demo", 32, 16)
    decay, no_decay = optim.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "backbone.cls_token", "backbone.pos_embed"} <= nd
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])


@pytest.mark.slow
def test_compiled_model_trains_like_eager(digits, tmp_path):
    def losses(out, **kw):
        T.train(tiny(digits, out, epochs=1, perturb=False, **kw))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    eager = losses(tmp_path / "eager")
    compiled = losses(tmp_path / "compiled", compile=True)
    assert len(eager) == len(compiled) == 4
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-3, atol=2e-3)


def test_continued_pretraining_starts_student_and_teacher_from_a_file(digits, tmp_path, capsys):
    from safetensors.torch import load_file

    from conmim import export as X

    T.train(tiny(digits, tmp_path / "a", epochs=1))
    path, _ = X.export(tmp_path / "a", tmp_path / "a.safetensors")
    out = tmp_path / "b"
    T.train(tiny(digits, out, epochs=1, init_from=str(path), base_momentum=1.0, final_momentum=1.0))
    assert f"init_from {str(path)!r}: 54 backbone tensors loaded" in capsys.readouterr().err
    teacher = ckpt.read_latest(out)["teacher"]  # momentum 1: the teacher is still what it started from
    weights = load_file(str(path))
    assert weights and all(torch.equal(teacher[f"backbone.{k}"], v) for k, v in weights.items())
    with pytest.raises(T.TrainingError, match=r"init_from '/no/such\.safetensors'"):
        T.train(tiny(digits, tmp_path / "c", init_from="/no/such.safetensors"))
    assert not (tmp_path / "c").exists()
