"""Nothing lost, nothing trusted blindly: a kill at every write boundary of a checkpoint, corruption of every
checkpoint file, a second run on a folder in use, resumes that would break the schedule, export and evaluation
without a verified checkpoint, and a teacher whose student changes under it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conmim import checkpoint as ckpt
from conmim import evaluate as E
from conmim import export as X
from conmim import train as T
from conmim.models import build_encoder
from conmim.teacher import MomentumTeacher
from tests.conftest import dcp_tensors, tiny
from tests.test_train import assert_identical

# Runs conmim-train with checkpoint._boundary replaced: the process dies (os._exit, no cleanup, like kill -9) the
# HITS-th time it reaches the boundary named BOUNDARY.
DRIVER = """
import os, sys
from conmim import checkpoint, train
boundary, hits = sys.argv[1], int(sys.argv[2])
seen = [0]
def die_at(name):
    if name == boundary:
        seen[0] += 1
        if seen[0] == hits:
            os._exit(9)
checkpoint._boundary = die_at
sys.exit(train.main(sys.argv[3:]))
"""
BOUNDARIES = ["files written", "manifest written", "renamed", "pruning"]


def _args(digits, out) -> list[str]:
    return [
        *("--config", "tiny_demo", "--data", str(digits), "--out", str(out), "--batch_size", "8"),
        *("--epochs", "3", "--num_workers", "0", "--loader", "torch", "--progress", "false"),
        *("--head_hidden", "64", "--head_out", "32", "--eval_every", "0", "--checkpoint_every", "2"),
        *("--keep_last", "1", "--keep_every_epochs", "1", "--warmup_epochs", "0.5"),
    ]


def _run(args, boundary=None, hits=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", DRIVER, boundary or "-", str(hits), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _run(_args(digits, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_kill_at_any_write_boundary_loses_nothing(digits, tmp_path, uninterrupted, boundary):
    """Killed at a boundary of the epoch-2 save (the fourth save: steps 2, 4, 6, 8; the second that prunes),
    then started again: the run ends with the uninterrupted run's checkpoint bit for bit, every epoch end is
    kept (keep_last 1, keep_every_epochs 1) and nothing half-written is left, whatever the boundary."""
    out = tmp_path / "run"
    hits = 2 if boundary == "pruning" else 4
    killed = _run(_args(digits, out), boundary, hits)
    assert killed.returncode == 9, killed.stderr[-3000:]
    done = _run(_args(digits, out))
    assert done.returncode == 0, done.stderr[-3000:]
    names = [p.name for p in ckpt.checkpoints(out)]
    assert names == ["ckpt-e0003-s00000012", "ckpt-e0002-s00000008", "ckpt-e0001-s00000004"]
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".deleting"))]
    whole = ckpt.checkpoints(uninterrupted)[0]
    assert_identical(dcp_tensors(out / names[0]), dcp_tensors(whole))


@pytest.fixture(scope="module")
def three_checkpoints(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "run"
    T.train(tiny(digits, out, epochs=1, checkpoint_every=1, keep_last=3))  # steps 2, 3, 4 survive
    return out


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata", "manifest.json"])
@pytest.mark.parametrize("damage", ["flip 64 bytes", "truncate", "delete"])
def test_a_damaged_checkpoint_is_never_loaded(three_checkpoints, tmp_path, victim, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    newest = ckpt.checkpoints(out)[0]
    f = newest / victim
    data = bytearray(f.read_bytes())
    if damage == "flip 64 bytes":
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    said = []
    state = ckpt.read_latest(out, said.append)
    assert state["step"] == 3, said
    assert len(said) == 2 and newest.name in said[0] and "is not used" in said[0]
    with pytest.raises(ckpt.CheckpointError):
        ckpt.verify(newest)


def test_a_checkpoint_lacking_a_part_falls_back_with_a_reason(digits, tmp_path):
    cfg = tiny(digits, tmp_path / "run", epochs=1, checkpoint_every=2)
    T.train(cfg)  # checkpoints at steps 2 and 4
    manager = ckpt.CheckpointManager(tmp_path / "run", keep_last=5)
    student = build_encoder("vit_tiny_demo", 64, 32, img_size=32, patch_size=4)
    teacher = MomentumTeacher(student)
    opt = torch.optim.AdamW(student.parameters())
    manager.save({"student": student, "teacher": teacher.module}, {"step": 5}, 1, 5, False)  # no optimizer
    said = []
    manager.log = said.append
    parts = {"student": student, "teacher": teacher.module, "optimizer": (student, opt)}
    run = manager.load_latest(parts)
    assert run["step"] == 4
    assert said[0].startswith(
        "checkpoint ckpt-e0001-s00000005 is not used (CheckpointError: it lacks optimizer)"
    )


def test_a_second_run_on_a_folder_in_use_is_refused_with_the_holder(digits, tmp_path):
    out = tmp_path / "run"
    args = [*_args(digits, out), "--epochs", "30"]
    first = subprocess.Popen([sys.executable, "-m", "conmim.train", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.1)
        assert (out / "metrics.jsonl").exists(), "the first run never started"
        config = (out / "config.yaml").read_bytes()
        second = subprocess.run(
            [sys.executable, "-m", "conmim.train", *args, "--lr", "1e-4"], capture_output=True, text=True
        )
        assert second.returncode == 2
        (line,) = [ln for ln in second.stderr.splitlines() if "error" in ln]
        assert f"is in use by pid {first.pid} on host " in line
        assert (out / "config.yaml").read_bytes() == config  # the refused run wrote nothing
    finally:
        first.kill()
        first.wait()
    resumed = _run([*args[:-2], "--epochs", "3"])  # the lock died with its holder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr


def test_a_resume_with_other_images_per_step_is_refused_before_anything_is_written(digits, tmp_path):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, batch_size=4))
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(
        T.TrainingError, match=r"holds checkpoints of another images_per_step \(4 there vs 8 here\)"
    ):
        T.train(tiny(digits, out, epochs=2, batch_size=8))
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    T.train(tiny(digits, out, epochs=2, batch_size=2, accum_steps=2))  # same product: the schedule continues
    assert ckpt.read_latest(out)["step"] == 16


def test_a_run_folder_whose_checkpoints_are_all_unusable_is_not_started_over(digits, tmp_path):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, keep_last=1))
    (newest,) = ckpt.checkpoints(out)
    (newest / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(T.TrainingError, match="holds checkpoints but none can be used"):
        T.train(tiny(digits, out, epochs=2))
    assert ckpt.checkpoints(out) == [newest]


def test_old_format_run_folders_get_a_one_line_error(digits, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "ckpt-e0001-s00000004.pt").write_bytes(b"x")
    for call in (
        lambda: T.train(tiny(digits, out)),
        lambda: X.export(out, tmp_path / "x.safetensors"),
    ):
        with pytest.raises(
            (ckpt.CheckpointError, T.TrainingError),
            match=r"written by conmim 0\.1 \(ckpt-e0001-s00000004\.pt\)",
        ):
            call()


def test_export_and_eval_refuse_a_run_without_a_verified_checkpoint(
    digits, labelled_digits, tmp_path, capsys
):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, keep_last=1))
    (newest,) = ckpt.checkpoints(out)
    (newest / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint that verifies"):
        X.export(out, tmp_path / "x.safetensors")
    assert E.main(["knn", str(out), "--data", str(labelled_digits), "--no-compare-random"]) == 2
    assert "holds no checkpoint that verifies" in capsys.readouterr().err
    assert not list(out.glob("eval_*.json"))


def test_output_paths_are_checked_before_the_work(digits, labelled_digits, tmp_path, capsys):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, keep_last=1))
    assert X.main([str(out), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "r.json"
    assert E.main(["knn", str(out), "--data", str(labelled_digits), "--json", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert T.main([*_args(digits, tmp_path / "file")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err


def test_eval_of_a_truncated_export_is_a_one_line_error(digits, labelled_digits, tmp_path, capsys):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, keep_last=1))
    path, _ = X.export(out, tmp_path / "x.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    assert E.main(["knn", str(path), "--data", str(labelled_digits)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("conmim-eval: error:")


@pytest.mark.parametrize(
    "value",
    [["--lr", "inf"], ["--min_lr", "nan"], ["--clip_grad", "-1"], ["--max_steps", "0"], ["--head_out", "0"]],
)
def test_values_that_would_ruin_a_run_are_refused_before_anything_is_written(digits, tmp_path, capsys, value):
    out = tmp_path / "run"
    assert T.main([*_args(digits, out), *value]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("conmim-train: error: config key") and value[0][2:] in line
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the teacher's checks
def _pair():
    student = build_encoder("vit_tiny_demo", 32, 16, img_size=32, patch_size=4)
    return student, MomentumTeacher(student, 0.9, 1.0, total_steps=10, backend="cpu")


def test_a_replaced_student_parameter_of_another_shape_is_refused():
    student, teacher = _pair()
    teacher.update(student, 0)
    student.head.net[0].weight = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="shape"):
        teacher.update(student, 1)


def test_a_student_moved_to_meta_is_refused_not_a_silent_no_op():
    student, teacher = _pair()
    teacher.update(student, 0)
    student.to("meta")
    with pytest.raises(ValueError, match="meta"):
        teacher.update(student, 1)


def test_a_new_student_of_another_architecture_is_checked_even_at_a_reused_address():
    student, teacher = _pair()
    teacher.update(student, 0)
    del student
    other = build_encoder("vit_tiny_demo", 48, 16, img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="shape"):
        teacher.update(other, 1)


def test_the_ema_still_moves_the_module_after_an_assign_load():
    student, teacher = _pair()
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(sd, assign=True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.module.parameters()]
    teacher.update(student, 0)
    moved = [not torch.equal(a, p) for a, p in zip(before, teacher.module.parameters())]
    assert all(moved)


def test_metrics_with_a_torn_line_still_plot(tmp_path):
    from conmim.metrics import loss_plot

    rows = [{"step": s, "epoch": 0, "loss": 5.0 - s / 10} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    assert loss_plot(tmp_path).stat().st_size > 1000
