"""The README's Use section, run exactly as written: its code blocks are the drop-in training loop, run at two
image sizes (two patch grids) as a user of another timm ViT would."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SIZE_LINE = re.compile(r"^epochs, image_size, batch = 1, (\d+), 2$", flags=re.M)


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
    data, loop = blocks
    assert "block_masks" in data and SIZE_LINE.search(data), "the data block sets the image size and masks"
    for name in ("ConMIMEncoder", "MomentumTeacher", "FusedPatchContrastLoss", "teacher.update"):
        assert name in loop, name
    # the loop consumes what conmim.data.build_loader yields: (student view, teacher view, mask)
    assert "for student_view, teacher_view, mask in loader:" in loop


def _run(code: str, ns: dict, name: str) -> dict:
    exec(compile(code, f"README.md, Use, {name}", "exec"), ns)
    return ns


def _params(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _at_size(data: str, size: int) -> str:
    """The data block with another image size (the README's line, with only the number changed)."""
    out, k = SIZE_LINE.subn(f"epochs, image_size, batch = 1, {size}, 2", data)
    assert k == 1
    return out


@pytest.mark.parametrize(("size", "grid"), [(224, (14, 14)), (96, (6, 6))])
def test_use_section_loop_trains(size, grid):
    """Both blocks in one namespace, at the README's 224 px (14 x 14 patches) and at 96 px (6 x 6, a grid on which
    a fixed count of 75 masked patches cannot exist): the features have the documented shapes, every image has a
    masked patch, the loss is a finite scalar, the optimizer moved the student and the EMA teacher moved towards
    it without reaching it."""
    data, loop = _python_blocks(_section("Use"))
    data = _at_size(data, size)
    cut = loop.index("\nstep = 0\n")
    torch.manual_seed(0)
    ns = _run(loop[:cut], _run(data, {}, "data"), "set-up")  # the loop block, run in two parts as written
    initial = _params(ns["student"])
    ns = _run(loop[cut:], ns, "loop")
    student, teacher, vit, mask = ns["student"], ns["teacher"], ns["vit"], ns["mask"]
    B, N = mask.shape
    assert student.grid == grid and N == grid[0] * grid[1] == vit.patch_embed.num_patches
    assert ns["step"] == ns["epochs"] * len(ns["loader"]) >= 2
    assert mask.dtype == torch.bool and mask.any(dim=1).all() and not mask.all(dim=1).any()
    assert ns["feats"].shape == ns["target"].shape == (B, N, 256)
    assert ns["feats"].requires_grad and not ns["target"].requires_grad
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"]) and ns["loss"] > 0
    final, ema = _params(student), _params(teacher.module)
    assert set(ema) == set(final) == set(initial)
    assert any(not torch.equal(final[n], initial[n]) for n in final), "the optimizer moved no weight"
    lag = sum(float((final[n] - ema[n]).abs().sum()) for n in final)
    moved = sum(float((ema[n] - initial[n]).abs().sum()) for n in final)
    assert lag > 0 and moved > 0, "the teacher must follow the student by EMA, not copy or ignore it"
