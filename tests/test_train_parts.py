"""conmim-train's parts on their own: the typed config, the run state, one step, the log, the checkpoint, the
teacher as a module, no host read in the step, and run folders a failed start leaves untouched."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conmim import checkpoint as ckpt
from conmim import config as cfgmod
from conmim import train as T
from conmim.metrics import Logger, Meter, loss_plot
from conmim.teacher import MomentumTeacher
from tests.conftest import dcp_tensors, requires_gpu, tiny


# ------------------------------------------------------------------------------------------------ configuration
def test_every_config_field_has_help_and_the_help_lists_it_with_its_default(capsys):
    fields = dataclasses.fields(cfgmod.TrainConfig)
    assert all(f.metadata["help"] for f in fields)
    with pytest.raises(SystemExit) as info:
        T.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for f in fields:
        assert f"--{f.name} {f.name.upper()}" in out
        assert f"(default: {f.default})" in out


def test_choice_lists_come_from_the_modules_that_define_them():
    from conmim import data, models, parallel

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(cfgmod.TrainConfig)}
    assert choices["strategy"] == tuple(parallel.STRATEGIES) and choices["precision"] == tuple(
        parallel.PRECISIONS
    )
    assert choices["loader"] == data.LOADERS and choices["mask"] == data.MASKS
    assert choices["model"] == tuple(models.MODELS) and choices["device"] == parallel.DEVICES


@pytest.mark.parametrize(
    "over,words",
    [
        ({"max_steps": 2.5}, "'max_steps' must be an integer"),
        ({"warmup_epochs": "x"}, "'warmup_epochs' must be a number"),
        ({"data": 3}, "'data' must be a string"),
        ({"compile": 1}, "'compile' must be true or false"),
        ({"accum_steps": 0}, "'accum_steps' must be a finite number >= 1"),
        ({"mask_ratio": 1.0}, "'mask_ratio' must be a number in (0, 1)"),
        ({"lr": float("inf")}, "'lr' must be a finite number > 0"),
        ({"lr": 0}, "'lr' must be a finite number > 0"),
        ({"min_lr": float("nan")}, "'min_lr' must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, "'weight_decay' must be a finite number >= 0"),
        ({"weight_decay": -0.1}, "'weight_decay' must be a finite number >= 0"),
        ({"clip_grad": float("nan")}, "'clip_grad' must be a finite number >= 0"),
        ({"clip_grad": -1}, "'clip_grad' must be a finite number >= 0"),
        ({"max_steps": 0}, "'max_steps' must be a finite number >= 1"),
        ({"warmup_epochs": -1}, "'warmup_epochs' must be a finite number >= 0"),
        ({"warmup_epochs": float("nan")}, "'warmup_epochs' must be a finite number >= 0"),
        ({"head_out": 0}, "'head_out' must be a finite number >= 1"),
        ({"head_hidden": 0}, "'head_hidden' must be a finite number >= 1"),
        ({"temperature": float("inf")}, "'temperature' must be a finite number > 0"),
        ({"beta2": 1.0}, "'beta2' must be a number in [0, 1)"),
        ({"base_momentum": 1.5}, "'base_momentum' must be a number in [0, 1]"),
        ({"min_lr": 1.0}, "min_lr 1.0 must not exceed lr"),
        ({"patch_size": 5}, "must be a multiple of patch_size 5"),
    ],
)
def test_config_rejects_bad_values(over, words):
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.resolve(cfgmod.TrainConfig, "tiny_demo", {"data": "x", **over})
    assert words in str(info.value)


def test_config_converts_numbers_to_the_keys_type():
    cfg = cfgmod.resolve(
        cfgmod.TrainConfig, "tiny_demo", {"data": "x", "epochs": 3.0, "lr": 1, "max_steps": None}
    )
    assert type(cfg.epochs) is int and type(cfg.lr) is float and cfg.max_steps is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 2.0


# ---------------------------------------------------------------------------------------------- the run's parts
def _run(digits, tmp_path, **kw) -> tuple[T.Run, T.RunState]:
    cfg = tiny(digits, tmp_path / "run", **kw)
    out = Path(cfg.out)
    run = T.build_run(cfg, 0, 1, torch.device("cpu"), out)
    out.mkdir(parents=True, exist_ok=True)
    run.log = Logger(out, 0)
    return run, T.RunState()


def _batches(run: T.Run, n: int, seed: int = 0):
    run.loader.set_epoch(0)
    it = iter(run.loader)
    return [next(it) for _ in range(n)]


def test_run_state_round_trips_with_the_rng(digits, tmp_path):
    state = T.RunState(epoch=2, batch=3, step=7, bad_streak=torch.tensor(1.0))
    saved = state.state_dict()
    expected = torch.rand(3)
    back = T.RunState()
    back.load_state_dict(saved)
    assert (back.epoch, back.batch, back.step, int(back.bad_streak)) == (2, 3, 7, 1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_updates_student_teacher_and_state(digits, tmp_path, accum):
    run, state = _run(digits, tmp_path, accum_steps=accum, batch_size=4)
    before_s = [p.detach().clone() for p in run.parallel.student.parameters()]
    before_t = [p.detach().clone() for p in run.parallel.teacher.parameters()]
    meter = Meter(run.device)
    T.train_step(run, state, iter(_batches(run, accum)), meter)
    assert (state.step, state.batch, int(state.bad_streak)) == (1, accum, 0)
    assert all(
        not torch.equal(a, p) for a, p in zip(before_s, run.parallel.student.parameters()) if p.ndim > 1
    )
    assert all(
        not torch.equal(a, p) for a, p in zip(before_t, run.parallel.teacher.parameters()) if p.ndim > 1
    )
    assert meter.losses == accum and int(meter.sums[1]) == accum and meter.images == 4 * accum
    assert all(p.grad is None for p in run.parallel.student.parameters())


def test_nonfinite_loss_skips_the_update_on_the_device(digits, tmp_path, monkeypatch):
    run, state = _run(digits, tmp_path)
    monkeypatch.setattr(type(run.loss_fn), "forward", lambda self, s, t, m, p=None: s.sum() * float("nan"))
    before = {k: v.clone() for k, v in run.parallel.student.state_dict().items()}
    meter = Meter(run.device)
    for _ in range(2):
        T.train_step(run, state, iter(_batches(run, 1)), meter)
    after = run.parallel.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "batches" not in k)
    assert all(int(s["step"]) == 0 for s in run.opt.state.values())  # AdamW's step count did not move
    assert (state.step, int(state.bad_streak), int(meter.sums[1]), meter.losses) == (2, 2, 0, 2)


def test_log_step_reports_the_mean_finite_loss_and_stops_on_a_streak(digits, tmp_path):
    run, state = _run(digits, tmp_path, max_bad_steps=2)
    meter = Meter(run.device)
    for loss in (1.0, 3.0, float("nan")):
        v = torch.tensor(loss)
        meter.add(v, torch.isfinite(v), 8)
    state.step, state.bad_streak = 3, torch.tensor(1.0)
    T.log_step(run, state, meter)
    state.bad_streak = torch.tensor(2.0)
    with pytest.raises(T.TrainingError, match="2 non-finite losses in a row"):
        T.log_step(run, state, meter)
    run.log.close()
    rows = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(2.0) and rows[0]["nonfinite_losses"] == 1
    assert rows[0]["bad_streak"] == 1 and rows[0]["step"] == 3
    assert "loss" not in rows[1] and meter.losses == 0


@pytest.mark.parametrize("epoch_end", [False, True])
def test_checkpoint_saves_the_state_and_says_in_its_manifest_whether_it_ends_an_epoch(
    digits, tmp_path, epoch_end
):
    run, state = _run(digits, tmp_path)
    state.epoch, state.batch, state.step = 1, 0, 8
    T.save_run_checkpoint(run, state, epoch_end)
    (path,) = ckpt.checkpoints(run.out)
    assert path.name == "ckpt-e0001-s00000008"
    manifest = ckpt.verify(path)
    assert (manifest["epoch"], manifest["step"], manifest["epoch_end"]) == (1, 8, epoch_end)
    assert manifest["images_per_step"] == 8
    saved = ckpt.read(path)
    assert (saved["epoch"], saved["batch"], saved["step"], saved["bad_streak"]) == (1, 0, 8, 0)
    assert saved["arch"] == cfgmod.arch(run.cfg)
    assert saved["teacher"].keys() == run.parallel.teacher.module.state_dict().keys()
    assert any(k.startswith("optimizer.state.") for k in dcp_tensors(path))


def test_every_epoch_end_is_kept_and_named_by_completed_epochs(digits, tmp_path):
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=3, keep_last=1, keep_every_epochs=1))  # 4 steps per epoch
    names = [p.name for p in ckpt.checkpoints(out)]
    assert names == ["ckpt-e0003-s00000012", "ckpt-e0002-s00000008", "ckpt-e0001-s00000004"]
    assert all(ckpt.verify(out / n)["epoch_end"] for n in names)


# --------------------------------------------------------------------------------------------- no host reads
READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu")


def test_no_device_read_in_the_training_step(digits, tmp_path, monkeypatch):
    """Counts reads of tensor values while train_step runs (none allowed) and while log_step runs (some, so the
    counter is live), over a run with accumulation, logs and checkpoints. Loading a batch is not the step's: the
    loader's CPU transforms run in worker processes in real runs."""
    where = {"phase": None}
    reads = {"train_step": 0, "log_step": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if where["phase"] is not None:
                reads[where["phase"]] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for phase in reads:
        original = getattr(T, phase)

        def wrapped(*a, _original=original, _phase=phase, **k):
            where["phase"] = _phase
            try:
                return _original(*a, **k)
            finally:
                where["phase"] = None

        monkeypatch.setattr(T, phase, wrapped)
    timed = T._timed

    def loading(*a, **k):  # the data pipeline (worker processes in real runs) reads CPU tensors: not counted
        batches = timed(*a, **k)
        while True:
            phase, where["phase"] = where["phase"], None
            item = next(batches, None)
            where["phase"] = phase
            if item is None:
                return
            yield item

    monkeypatch.setattr(T, "_timed", loading)
    T.train(tiny(digits, tmp_path / "run", accum_steps=2, batch_size=4, log_every=2, checkpoint_every=3))
    assert reads["train_step"] == 0
    assert reads["log_step"] >= 2


# ------------------------------------------------------------------------------------------------ run folders
def _snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    T.train(tiny(digits, out, epochs=1))
    return out


@pytest.mark.parametrize("case", ["missing data folder", "folder of non-images"])
def test_a_failed_start_leaves_a_finished_run_unchanged(digits, tmp_path, finished_run, case):
    before = _snapshot(finished_run)
    data = tmp_path / "does" / "not" / "exist"
    if case == "folder of non-images":
        data = tmp_path / "junk"
        (data / "a").mkdir(parents=True)
        (data / "a" / "x.png").write_bytes(b"not an image")
    error = FileNotFoundError if case == "missing data folder" else ValueError
    with pytest.raises(error):
        T.train(tiny(digits, finished_run, epochs=1, data=str(data)))
    assert _snapshot(finished_run) == before


def test_read_latest_names_the_action_and_the_progress(finished_run):
    said = []
    state = ckpt.read_latest(finished_run, said.append, "exporting")
    assert said == ["exporting ckpt-e0001-s00000004 (1 epoch done, step 4)"] and state["step"] == 4
    assert (
        ckpt.progress_text({"epoch": 5, "batch": 62, "step": 372}) == "5 epochs and 62 batches done, step 372"
    )


def test_a_finished_run_started_again_says_so(digits, finished_run, capsys):
    before = ckpt.checkpoints(finished_run)
    summary = T.train(tiny(digits, finished_run, epochs=1))
    assert "already complete (4 of 4 steps)" in capsys.readouterr().err
    assert summary["steps"] == 4 and ckpt.checkpoints(finished_run) == before


def test_excluded_files_are_plain_log_lines(digits, tmp_path, capsys):
    data = tmp_path / "data"
    for f in sorted(Path(digits).rglob("*.png")):
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        (data / f.parent.name / f.name).write_bytes(f.read_bytes())
    (data / "0" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    T.train(tiny(digits, out, epochs=1, data=str(data)))
    err = capsys.readouterr().err
    assert f"conmim-train: excluding {data / '0' / 'broken.png'}: " in err
    assert "broken.png" in (out / "bad_files.tsv").read_text()


# ------------------------------------------------------------------------------------------ teacher as a module
def test_momentum_teacher_is_a_module():
    from conmim.models import build_encoder

    student = build_encoder("vit_tiny_demo", 32, 16, img_size=32, patch_size=4)
    teacher = MomentumTeacher(student, 0.9, 1.0, total_steps=10)
    assert isinstance(teacher, torch.nn.Module) and teacher.training
    sd = teacher.state_dict()
    assert all(k.startswith("module.") for k in sd)
    teacher.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    assert teacher.update(student, 0) == pytest.approx(0.9)
    assert teacher.update(student, momentum=0.5) == 0.5
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 64, 16)
    assert not teacher.eval().training and not teacher.module.training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_under_autocast_feeds_the_loss_low_precision_features(
    digits, tmp_path, monkeypatch, precision
):
    run, state = _run(digits, tmp_path, precision=precision)
    seen = []
    forward = type(run.loss_fn).forward

    def spy(self, student, teacher, *a, **k):
        seen.append((student.dtype, teacher.dtype))
        return forward(self, student, teacher, *a, **k)

    monkeypatch.setattr(type(run.loss_fn), "forward", spy)
    before = [p.detach().clone() for p in run.parallel.student.parameters()]
    meter = Meter(run.device)
    T.train_step(run, state, iter(_batches(run, 1)), meter)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == [(low, low)]  # what autocast produced, no cast to fp32 on the way
    assert int(meter.sums[1]) == 1 and torch.isfinite(meter.sums[0])
    assert run.scaler.is_enabled() == (precision == "fp16")
    if precision == "bf16":  # fp16's first step may be skipped by the scaler while it finds its scale
        assert any(not torch.equal(a, p) for a, p in zip(before, run.parallel.student.parameters()))


@requires_gpu
def test_training_step_makes_no_cuda_sync(digits, tmp_path):
    run, state = _run(digits, tmp_path, device="cuda", precision="bf16")
    batches = _batches(run, 2)
    meter = Meter(run.device)
    T.train_step(run, state, iter(batches[:1]), meter)  # warm-up: kernels compiled, optimizer state created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        T.train_step(run, state, iter(batches[1:]), meter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.step == 2


def test_loss_plot_adds_the_knn_curve_and_its_baseline(tmp_path):
    losses = [{"step": s, "epoch": 0, "loss": 5.0 - s / 10} for s in range(5, 40, 5)]
    knn = [{"epoch": 0, "step": 0, "knn_top1_random_init": 0.32}, {"epoch": 1, "step": 20, "knn_top1": 0.35}]
    pngs = []
    for name, rows in (("plain", losses), ("with-knn", [knn[0], *losses, knn[1]])):
        out = tmp_path / name
        out.mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        pngs.append(loss_plot(out).read_bytes())
    assert pngs[1] != pngs[0], "the k-NN curve and its baseline were not drawn"


def test_progress_bar_keeps_the_knn_beside_the_loss(digits, labelled_digits, tmp_path):
    class Bar:
        def set_postfix(self, fields):
            self.shown = dict(fields)

    run, state = _run(digits, tmp_path, eval_every=1, eval_data=str(labelled_digits))
    run.progress = Bar()
    T.monitor(run, state)  # step 0: the baseline
    meter = Meter(run.device)
    meter.add(torch.tensor(2.5), torch.tensor(True), 8)
    state.step = 1
    T.log_step(run, state, meter)
    assert run.progress.shown["loss"] == "2.500"
    assert run.progress.shown["knn"] == f"{100 * state.knn_random_init:.1f}%"
