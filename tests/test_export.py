"""conmim-export's files: ordinary permissions, and a printed load call that works when pasted."""

import json
import os

import pytest
import torch

from conmim import checkpoint as ckpt
from conmim import export as X
from conmim import train as T
from tests.conftest import tiny


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    T.train(tiny(digits, out, epochs=1))
    return out


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_get_ordinary_permissions(run, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert X.main([str(run), "--out", str(tmp_path / "t.safetensors")]) == 0
    finally:
        os.umask(old)
    for name in ("t.safetensors", "t.safetensors.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "t.safetensors.json"]


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_printed_load_call_loads_the_weights(run, tmp_path, capsys, which):
    import timm
    from safetensors.torch import load_file

    assert X.main([str(run), "--out", str(tmp_path / "w.safetensors"), "--which", which]) == 0
    lines = capsys.readouterr().out.splitlines()
    call = lines[-1].removeprefix("load it with: ")
    assert call.startswith("timm.create_model(") and "**" not in call
    meta = json.loads((tmp_path / "w.safetensors.json").read_text())
    assert meta["load"] == call and meta["which"] == which
    model = eval(call, {"timm": timm})
    weights = load_file(str(tmp_path / "w.safetensors"))
    assert set(weights) == set(model.state_dict())
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    state = ckpt.read(ckpt.checkpoints(run)[0])
    assert torch.equal(weights["blocks.0.attn.qkv.weight"], state[which]["backbone.blocks.0.attn.qkv.weight"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.embed_dim)


def test_exported_model_rebuilds_conmim_evals_transform_and_features(run, digits, tmp_path, capsys):
    """export -> the printed timm call -> timm.data.resolve_data_config + create_transform -> the model's own
    features: the same preprocessing and the same features as conmim-eval (mean-pooled patch tokens after the
    final norm), not timm's defaults (mean/std 0.5, 224 px, the class token or a new norm after the pooling)."""
    import timm
    from PIL import Image

    from conmim import evaluate as E
    from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD

    out = tmp_path / "t.safetensors"
    assert X.main([str(run), "--out", str(out)]) == 0
    call = capsys.readouterr().out.splitlines()[-1].removeprefix("load it with: ")
    model = eval(call, {"timm": timm}).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD
    transform = timm.data.create_transform(**cfg)

    # 12 digits (28 px, resized to 32) and 4 random non-square photos larger than the input
    files = sorted(str(p) for p in (digits / "train").rglob("*.png"))[:12]
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(40, 57), (64, 48), (33, 90), (75, 75)]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"p{i}.png")
        files.append(str(tmp_path / f"p{i}.png"))

    # conmim-eval's features of the exported file, and its preprocessed pixels
    eval_model, size = E.load_backbone(str(out))
    assert size == 32
    want = E.features(eval_model, files, size)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    eval_pixels = (E.load_images(files, size).float() / 255 - mean) / std

    timm_pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    assert timm_pixels.shape == eval_pixels.shape == (len(files), 3, 32, 32)
    # PIL's and torchvision's bicubic resampling may round a pixel differently by a level or two
    assert (timm_pixels - eval_pixels).abs().max() <= 3 / 255 / min(IMAGENET_STD)
    with torch.no_grad():
        got = torch.nn.functional.normalize(model(timm_pixels), dim=-1)
        same_input = torch.nn.functional.normalize(model(eval_pixels), dim=-1)
    torch.testing.assert_close(same_input, want, atol=1e-5, rtol=1e-5)  # the pooling is conmim-eval's
    assert (got * want).sum(-1).min() > 0.999  # and so are the features from timm's own transform
    # the file's pooling is not timm's default for this model: the class token gives other features
    cls = timm.create_model(
        model.default_cfg["architecture"],
        pretrained=False,
        num_classes=0,
        **{
            k: v
            for k, v in json.loads((tmp_path / "t.safetensors.json").read_text())["kwargs"].items()
            if k not in ("global_pool", "fc_norm")
        },
    )
    cls.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (torch.nn.functional.normalize(cls.eval()(eval_pixels), dim=-1) * want).sum(-1).min() < 0.99
