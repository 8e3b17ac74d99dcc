"""The README's Use section, run exactly as written: its code blocks are the drop-in training loop."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_use_section_has_the_data_block_and_the_loop():
    blocks = _python_blocks(_section("Use"))
    assert len(blocks) == 2, "Use holds a stand-in data block and the training loop"
    loop = blocks[1]
    for name in (
        "ConMIMEncoder",
        "MomentumTeacher",
        "FusedPatchContrastLoss",
        "block_masks",
        "teacher.update",
    ):
        assert name in loop, name


def _run(code: str, ns: dict, name: str) -> dict:
    exec(compile(code, f"README.md, Use, {name}", "exec"), ns)
    return ns


def _params(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_use_section_loop_trains():
    """Both blocks in one namespace: the features have the documented shapes, the loss is a finite scalar, the
    optimizer moved the student and the EMA teacher moved towards it without reaching it."""
    data, loop = _python_blocks(_section("Use"))
    setup = loop[: loop.index("\nstep = 0\n")]
    torch.manual_seed(0)
    initial = _params(_run(setup, _run(data, {}, "data"), "set-up")["student"])
    torch.manual_seed(0)
    ns = _run(loop, _run(data, {}, "data"), "loop")
    student, teacher, vit, mask = ns["student"], ns["teacher"], ns["vit"], ns["mask"]
    B, N = mask.shape
    assert ns["step"] == ns["epochs"] * len(ns["loader"]) >= 2
    assert vit.patch_embed.num_patches == N and mask.dtype == torch.bool and mask.any()
    assert ns["feats"].shape == ns["target"].shape == (B, N, 256)
    assert ns["feats"].requires_grad and not ns["target"].requires_grad
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
    final, ema = _params(student), _params(teacher.module)
    assert set(ema) == set(final) == set(initial)
    assert any(not torch.equal(final[n], initial[n]) for n in final), "the optimizer moved no weight"
    lag = sum(float((final[n] - ema[n]).abs().sum()) for n in final)
    moved = sum(float((ema[n] - initial[n]).abs().sum()) for n in final)
    assert lag > 0 and moved > 0, "the teacher must follow the student by EMA, not copy or ignore it"
