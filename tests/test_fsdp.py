"""conmim.parallel.Sharded (FSDP2) on the CPU with gloo: sharding, mixed precision, activation checkpointing, the
EMA on local shards, checkpoints of sharded state (atomic, resumable at another world size, readable by export).

In-process tests run on a one-rank process group; the multi-rank ones launch tests/fsdp_ranks.py under torchrun
(each rank a real process) and compare with the same steps run here on one process without FSDP.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from conmim import checkpoint as ckpt
from conmim import config as cfgmod
from conmim import parallel
from conmim.loss import FusedPatchContrastLoss
from conmim.teacher import MomentumTeacher
from tests import fsdp_ranks as R
from tests.test_scaleout import _free_port

ROOT = Path(__file__).resolve().parents[1]
# max |difference| of parameters after a few AdamW steps: reduction order changes the last bits of gradients,
# and AdamW turns a relative change of a gradient entry into a relative change of its update; the teacher moves
# by (1 - momentum) of that. Both are far below what the steps move the weights (checked in _assert_weights).
ATOL = {"student": 2e-4, "teacher": 2e-6}


# ---------------------------------------------------------------------------------------- helpers and fixtures
def launch(world: int, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "tests.fsdp_ranks", str(out), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _result(out: Path, world: int) -> dict:
    return torch.load(out / f"result-w{world}.pt", weights_only=True)


def _weights(state: dict) -> dict:
    """Parameters only: BatchNorm running statistics are per rank (each rank sees its own micro-batches)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def _assert_weights(got: dict, want: dict) -> None:
    init = _weights(R.encoder().state_dict())
    for which, atol in ATOL.items():
        a, b = _weights(got[which]), _weights(want[which])
        assert a.keys() == b.keys() == init.keys()
        moved = max((b[k] - init[k]).abs().max().item() for k in b)
        assert moved > 20 * atol, (
            f"the {which} barely moved ({moved:.2e}): the comparison would prove nothing"
        )
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{which} {k}: {{}}".format)


def _assert_steps(got: dict, want: dict, steps) -> None:
    """Losses and gradient norms: 1e-5 at the first step (same weights), 1e-4 later (the weights have drifted
    by reduction order); the momenta exactly."""
    for key in ("losses", "grad_norms"):
        assert sorted(got[key]) == list(steps)
        for k in steps:
            rel = 1e-5 if k == steps[0] else 1e-4
            assert got[key][k] == pytest.approx(want[key][k], rel=rel), (key, k)
    assert {k: got["momenta"][k] for k in steps} == {k: want["momenta"][k] for k in steps}


@pytest.fixture(scope="module")
def reference() -> dict:
    """The steps of tests/fsdp_ranks.py on one process, no FSDP, all micro-batches accumulated here, the
    project's MomentumTeacher as the teacher."""
    student = R.encoder()
    teacher = MomentumTeacher(student, 0.99, 1.0, R.TOTAL_STEPS)
    opt = R.optimizer(student)
    loss_fn = FusedPatchContrastLoss(temperature=0.1)
    out = {"losses": {}, "grad_norms": {}, "momenta": {}}
    for k in range(4):
        total, out["grad_norms"][k] = R.train_step(student, teacher, opt, k, range(R.MICRO), loss_fn)
        out["losses"][k], out["momenta"][k] = float(total) / R.MICRO, teacher.momentum(k)
    return {**out, "student": student.state_dict(), "teacher": teacher.module.state_dict()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """4 steps on 2 ranks, checkpointed before step 2."""
    out = tmp_path_factory.mktemp("two_ranks")
    launch(2, out, "--steps", "4", "--save_at", "2")
    return out


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo process group and its mesh, for the in-process tests."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this pytest process")
    parallel.init_process_group(torch.device("cpu"))
    yield
    dist.destroy_process_group()


def _prepared(mesh, precision="bf16", grad_checkpointing=False):
    return R.sharded(precision, True, grad_checkpointing)


def _parts(student, teacher, opt) -> dict:
    return {"student": student, "teacher": teacher.module, "optimizer": (student, opt)}


def _save(out, student, teacher, opt, run: dict, step: int) -> Path:
    return ckpt.CheckpointManager(out, keep_last=100).save(_parts(student, teacher, opt), run, 0, step, False)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_step(student, teacher, opt, step: int = 0) -> None:
    R.train_step(student, teacher, opt, step, range(2), FusedPatchContrastLoss(temperature=0.1))


# ------------------------------------------------------------------------------------------------- in-process
def test_prepare_shards_every_block_the_head_and_the_root_of_both(mesh):
    student, teacher = _prepared(mesh)
    for model in (student, teacher.module):
        units = [model, model.head, *model.backbone.blocks]
        assert all(isinstance(m, FSDPModule) for m in units)
        assert not isinstance(model.backbone, FSDPModule)
        for p in model.parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.training and teacher.module.head.net[1].training  # batch statistics, as ConMIM's teacher
    teacher.eval()  # honoured, as for a replicated student
    assert not teacher.training and not teacher.module.head.net[1].training


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_blocks_compute_in_the_precision_and_gradients_stay_fp32(mesh, precision):
    student, teacher = _prepared(mesh, precision=precision)
    seen = {}
    student.backbone.blocks[1].register_forward_hook(lambda m, i, o: seen.update(block=o.dtype))
    student.head.net[0].register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    xs, xt, mask = R.micro_batch(0, 0)
    feats = student(xs, mask)
    with torch.no_grad():
        target = teacher(xt)
    assert seen == {"block": parallel.PRECISIONS[precision], "head": torch.float32}
    assert feats.dtype == target.dtype == torch.float32
    FusedPatchContrastLoss()(feats, target, mask).backward()
    for p in student.parameters():
        assert p.grad.to_local().dtype == torch.float32 and torch.isfinite(p.grad.to_local()).all()
    plain = R.encoder()
    torch.testing.assert_close(
        feats.detach(), plain(xs, mask).detach(), **({} if precision == "fp32" else dict(atol=0.1, rtol=0.1))
    )


def _grads_and_attention_calls(mesh, checkpointing: bool) -> tuple[dict, int]:
    student, _ = _prepared(mesh, precision="fp32", grad_checkpointing=checkpointing)
    calls = []
    student.backbone.blocks[2].attn.register_forward_hook(lambda *_: calls.append(1))
    xs, _, mask = R.micro_batch(1, 0)
    student(xs, mask).square().mean().backward()
    return {k: p.grad.to_local().clone() for k, p in student.named_parameters()}, len(calls)


def test_grad_checkpointing_recomputes_the_blocks_and_keeps_the_gradients(mesh):
    plain, once = _grads_and_attention_calls(mesh, False)
    recomputed, twice = _grads_and_attention_calls(mesh, True)
    assert (once, twice) == (1, 2)  # forward, then the recomputation in the backward
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)
    student = R.encoder()
    parallel.checkpoint_blocks(student)
    with pytest.raises(ValueError, match="already checkpointed"):
        parallel.checkpoint_blocks(student)


def test_teacher_update_is_one_fused_call_on_the_local_shards(mesh, monkeypatch):
    student, teacher = _prepared(mesh)
    with torch.no_grad():
        for p in student.parameters():
            p.to_local().add_(torch.randn_like(p.to_local()))
    before = [p.to_local().clone() for p in teacher.parameters()]
    calls = []
    from conmim import teacher as teacher_module

    fused = teacher_module.ema_update_op
    monkeypatch.setattr(
        teacher_module, "ema_update_op", lambda t, s, *a: calls.append((t, s)) or fused(t, s, *a)
    )
    m = teacher.update(student, 5)
    assert m == MomentumTeacher(R.encoder(), 0.99, 1.0, R.TOTAL_STEPS).momentum(5) and 0.99 < m < 1
    assert len(calls) == 1 and all(type(t) is torch.Tensor for t in [*calls[0][0], *calls[0][1]])
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t.to_local(), t0 + (1 - m) * (s.to_local() - t0), atol=1e-6, rtol=1e-6)


def test_momentum_teacher_refuses_a_sharded_student(mesh):
    student, _ = _prepared(mesh)
    with pytest.raises(TypeError, match=r"student is already sharded \(FSDP\).*conmim.parallel.Sharded"):
        MomentumTeacher(student)


def test_update_refuses_another_architecture(mesh):
    _, teacher = _prepared(mesh)
    with pytest.raises(ValueError, match="student has 2 parameters but the teacher has"):
        teacher.update(torch.nn.Linear(2, 3), 0)


def test_save_then_load_restores_weights_optimizer_and_run_state(mesh, tmp_path):
    student, teacher = _prepared(mesh)
    opt = R.optimizer(student)
    _local_step(student, teacher, opt)
    run = {"step": 1, "rng": torch.get_rng_state(), "python": random.getstate(), "nested": {"lr": 0.5}}
    path = _save(tmp_path, student, teacher, opt, run, 1)
    assert ckpt.checkpoints(tmp_path) == [path] and ckpt.verify(path)["step"] == 1
    saved = {  # cloned: on one CPU rank the full state dict may share the parameters' storage
        k: {n: v.clone() for n, v in parallel.full_state_dict(m).items()}
        for k, m in (("student", student), ("teacher", teacher.module))
    }
    saved_opt = {k: _plain(v).clone() for k, v in opt.state[next(iter(student.parameters()))].items()}
    _local_step(student, teacher, opt, 1)
    assert not torch.equal(
        parallel.full_state_dict(student)["backbone.cls_token"], saved["student"]["backbone.cls_token"]
    )
    back = ckpt.CheckpointManager(tmp_path).load_latest(_parts(student, teacher, opt))
    assert back.keys() == run.keys() and back["python"] == run["python"] and back["nested"] == run["nested"]
    assert torch.equal(back["rng"], run["rng"]) and back["step"] == 1
    for which, module in (("student", student), ("teacher", teacher.module)):
        now = parallel.full_state_dict(module)
        assert all(torch.equal(now[k], v) for k, v in saved[which].items()), which
    for k, v in opt.state[next(iter(student.parameters()))].items():
        assert torch.equal(_plain(v), saved_opt[k]), k
    plain = ckpt.read(path)
    assert plain.keys() == {"student", "teacher", *run}
    for which in ("student", "teacher"):
        assert plain[which].keys() == saved[which].keys()
        assert all(torch.equal(plain[which][k], v) for k, v in saved[which].items()), which


def test_an_interrupted_save_leaves_the_previous_checkpoint(mesh, tmp_path, monkeypatch):
    student, teacher = _prepared(mesh)
    opt = R.optimizer(student)
    first = _save(tmp_path, student, teacher, opt, {"step": 1}, 1)
    write = FileSystemWriter.write_data

    def write_then_fail(self, plan, planner):
        write(self, plan, planner).wait()
        raise OSError("disk full")

    monkeypatch.setattr(FileSystemWriter, "write_data", write_then_fail)
    with pytest.raises(CheckpointException, match="disk full"):
        _save(tmp_path, student, teacher, opt, {"step": 2}, 2)
    assert ckpt.checkpoints(tmp_path) == [first]
    half = tmp_path / "ckpt-e0000-s00000002.tmp"
    assert half.is_dir() and list(half.glob("*.distcp")) and not (half / ckpt.MANIFEST).exists()
    assert ckpt.CheckpointManager(tmp_path).load_latest(_parts(student, teacher, opt)) == {"step": 1}
    assert not half.exists()  # a resume removes what a killed save left
    monkeypatch.setattr(FileSystemWriter, "write_data", write)
    second = _save(tmp_path, student, teacher, opt, {"step": 2}, 2)
    again = _save(tmp_path, student, teacher, opt, {"step": 3}, 2)  # replaces it
    assert ckpt.checkpoints(tmp_path) == [second, first]
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name]
    assert again == second and ckpt.read(second)["step"] == 3


def test_load_latest_skips_what_does_not_verify(mesh, tmp_path):
    student, teacher = _prepared(mesh)
    opt = R.optimizer(student)
    _save(tmp_path, student, teacher, opt, {"step": 1}, 1)
    forged = tmp_path / "ckpt-e0000-s00000002"
    forged.mkdir()
    (forged / ".metadata").write_bytes(b"not a checkpoint")
    (forged / ckpt.MANIFEST).write_text('{"format": 2, "files": {".metadata": {"bytes": 3, "sha256": "0"}}}')
    (tmp_path / "ckpt-e0000-s00000003").mkdir()  # no manifest: never complete
    said = []
    manager = ckpt.CheckpointManager(tmp_path, log=said.append)
    assert manager.load_latest(_parts(student, teacher, opt)) == {"step": 1}
    assert said == [
        "checkpoint ckpt-e0000-s00000003 is not used (incomplete: it has no manifest); trying the previous one",
        "checkpoint ckpt-e0000-s00000002 is not used (.metadata has 16 bytes, the manifest says 3); trying the "
        "previous one",
        "resuming from ckpt-e0000-s00000001 (0 epochs done, step 1)",
    ]
    assert ckpt.CheckpointManager(tmp_path / "none").load_latest(_parts(student, teacher, opt)) is None


@pytest.mark.parametrize(
    "run, error",
    [
        ([1], "run_state must be a dict"),
        ({"where": Path("x")}, "run_state must hold only"),
        ({"f": len}, "run_state must hold only"),
    ],
)
def test_a_run_state_that_cannot_come_back_is_refused_before_writing(mesh, tmp_path, run, error):
    student, teacher = _prepared(mesh)
    with pytest.raises(TypeError, match=error):
        _save(tmp_path, student, teacher, R.optimizer(student), run, 1)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_bad_arguments_get_clear_errors(mesh, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        R.sharded(precision="fp8")
    with pytest.raises(TypeError, match="reshard_after_forward must be True or False"):
        R.sharded(reshard="yes")
    plain = R.encoder()
    with pytest.raises(ValueError, match="backend must be one of"):
        R.sharded(model=plain, backend="gpu")
    assert not isinstance(plain, FSDPModule)  # refused before anything was sharded
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.zeros(3)}, checkpoint_id=tmp_path / "ckpt-other")
    with pytest.raises(ckpt.CheckpointError, match="incomplete: it has no manifest"):
        ckpt.read(tmp_path / "ckpt-other")


def test_export_reads_an_fsdp_run_and_timm_loads_it(mesh, tmp_path):
    import timm
    from safetensors.torch import load_file

    from conmim import export as X

    run = tmp_path / "run"
    cfg = cfgmod.resolve(cfgmod.TrainConfig, "tiny_demo", dict(data="unused", head_hidden=64, head_out=32))
    run.mkdir()
    cfgmod.dump(cfg, run / "config.yaml")
    student, teacher = _prepared(mesh)
    opt = R.optimizer(student)
    _local_step(student, teacher, opt)
    _save(run, student, teacher, opt, {"step": 1}, 1)
    broken = run / "ckpt-e0000-s00000002"  # a newest one that does not verify: the previous one is read
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"not a checkpoint")
    path, meta = X.export(run, tmp_path / "teacher.safetensors")
    weights = load_file(str(path))
    full = parallel.full_state_dict(teacher.module)
    assert meta["step"] == 1 and weights.keys() == {
        k[len("backbone.") :] for k in full if k.startswith("backbone.")
    }
    model = timm.create_model(
        meta["timm_model"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=0,
        **meta["kwargs"],
    )
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v) and torch.equal(v, full["backbone." + k]), k


def test_the_memory_benchmark_counts_one_fsdp_rank_as_ddp(mesh):
    from benchmarks import bench_fsdp_memory as B

    student, teacher = R.sharded(model=B._meta_encoder("vit_tiny_demo"))
    got = B._state_bytes(student, list(teacher.parameters()), torch.optim.AdamW(student.parameters()))
    n = sum(p.numel() for p in student.parameters())
    count = len(list(student.parameters()))
    assert got == B.ddp_bytes("vit_tiny_demo")
    assert got == {"student": 4 * n, "gradients": 4 * n, "optimizer": 8 * n + 4 * count, "teacher": 4 * n}


# ------------------------------------------------------------------------------------------------- multi-rank
@pytest.mark.slow
def test_two_ranks_match_one_process(two_ranks, reference):
    got = _result(two_ranks, 2)
    _assert_steps(got, reference, range(4))
    _assert_weights(got, reference)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_a_two_rank_checkpoint_resumes_at_another_world_size(two_ranks, tmp_path, world):
    (tmp_path / "ckpt-e0000-s00000002").symlink_to(two_ranks / "ckpt-e0000-s00000002")
    launch(world, tmp_path, "--steps", "4", "--resume")
    got, want = _result(tmp_path, world), _result(two_ranks, 2)
    _assert_steps(got, want, range(2, 4))
    _assert_weights(got, want)


@pytest.mark.slow
def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_to_resume_from(two_ranks, tmp_path):
    died = launch(2, tmp_path, "--steps", "4", "--save_at", "1", "--die_saving", "2", "--reshard", "false",
                  "--grad_checkpointing", "true", check=False)  # fmt: skip
    assert died.returncode != 0
    half = tmp_path / "ckpt-e0000-s00000002.tmp"
    assert ckpt.checkpoints(tmp_path) == [tmp_path / "ckpt-e0000-s00000001"]
    assert (half / "__1_0.distcp").is_file() and not (half / ckpt.MANIFEST).exists()
    launch(2, tmp_path, "--steps", "4", "--resume", "--save_at", "2")
    assert not half.exists() and ckpt.checkpoints(tmp_path)[0].name == "ckpt-e0000-s00000002"
    got, want = _result(tmp_path, 2), _result(two_ranks, 2)
    # resumed on as many ranks: the same run bit for bit (rank 0's BatchNorm statistics included), although the
    # first step ran with activation checkpointing and without resharding
    assert {k: got["losses"][k] for k in range(1, 4)} == {k: want["losses"][k] for k in range(1, 4)}
    for which in ("student", "teacher"):
        assert got[which].keys() == want[which].keys()
        assert all(torch.equal(got[which][k], v) for k, v in want[which].items()), which
