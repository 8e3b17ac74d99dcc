"""init_from: a ConMIM encoder's backbone from existing weights (a file, a run's checkpoint, a timm model from
local weights), resampled to the encoder's grid, with the mask token and the projection head left fresh."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from conmim import models as M
from conmim.models import init_from


def _enc(name="beit_tiny_demo", seed=0, **kw):
    torch.manual_seed(seed)
    return M.build_encoder(name, 64, 16, **kw)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["beit_tiny_demo", "vit_tiny_demo"])
def test_encoder_state_dict_loads_backbone_only(name, tmp_path):
    src, dst = _enc(name, 0), _enc(name, 1)
    head, mask = dict(dst.head.state_dict()), dst.mask_token.detach().clone()
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    lines = []
    report = init_from(dst, path, log=lines.append)
    assert _same(dst.backbone.state_dict(), src.backbone.state_dict())
    assert _same(dict(dst.head.state_dict()), head) and torch.equal(dst.mask_token, mask)
    assert report.missing == [] and report.unexpected == [] and report.resampled == []
    assert "mask_token" in report.fresh and "head.net.0.weight" in report.fresh
    assert len(lines) == 4 and lines[1] == "init_from missing (kept fresh): none"


def test_pth_with_official_wrapper_and_namespace(tmp_path):
    src, dst = _enc(seed=0), _enc(seed=1)
    path = tmp_path / "ckpt.pth"
    sd = {"module." + k: v for k, v in src.backbone.state_dict().items()}
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(model="x", lr=1e-3)}, path)
    init_from(dst, path)
    assert _same(dst.backbone.state_dict(), src.backbone.state_dict())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "thing": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match="not unpickled"):
        init_from(_enc(), path)


def test_beit_relative_table_resampled_to_a_larger_grid():
    from timm.layers import resize_rel_pos_bias_table

    src = _enc(seed=0)
    with torch.no_grad():
        src.backbone.rel_pos_bias.relative_position_bias_table.normal_()
    dst = _enc(seed=1, img_size=48)  # 12 x 12 grid instead of 8 x 8
    report = init_from(dst, src.state_dict())
    key = "rel_pos_bias.relative_position_bias_table"
    assert report.resampled == [key] and report.missing == [] and report.unexpected == []
    want = resize_rel_pos_bias_table(
        src.backbone.state_dict()[key], new_window_size=(12, 12), new_bias_shape=(23 * 23 + 3, 4)
    )
    torch.testing.assert_close(dst.backbone.state_dict()[key], want, rtol=0, atol=0)
    torch.testing.assert_close(
        dst.backbone.blocks[1].mlp.fc1.weight, src.backbone.blocks[1].mlp.fc1.weight, rtol=0, atol=0
    )


def test_vit_position_embedding_resampled():
    from timm.layers import resample_abs_pos_embed

    src, dst = _enc("vit_tiny_demo", 0), _enc("vit_tiny_demo", 1, img_size=48)
    report = init_from(dst, src.state_dict(), which="student")
    assert report.resampled == ["pos_embed"] and report.missing == []
    want = resample_abs_pos_embed(src.backbone.pos_embed.detach(), new_size=(12, 12), num_prefix_tokens=1)
    torch.testing.assert_close(dst.backbone.pos_embed.detach(), want, rtol=0, atol=0)


def test_shared_table_fills_per_block_tables_with_the_same_features():
    """A pretraining (shared-table) source into a fine-tuning layout Beit (a table per block): each block gets
    the shared table, and the backbone gives the source's features."""
    import timm

    src = _enc(seed=0)
    with torch.no_grad():
        src.backbone.rel_pos_bias.relative_position_bias_table.normal_()
    spec = dict(M.model_spec("beit_tiny_demo")[1], use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    dst = M.ConMIMEncoder(timm.create_model("beit_base_patch16_224", num_classes=0, **spec), 64, 16)
    report = init_from(dst, src.state_dict())
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval().features(x), src.eval().features(x), rtol=1e-5, atol=1e-5)


def test_missing_and_unexpected_keys_are_reported_not_raised():
    src = _enc("vit_tiny_demo", 0, init_values=0.1)  # has layer scale
    dst = _enc("vit_tiny_demo", 1)  # has none
    sd = dict(src.state_dict())
    del sd["backbone.norm.weight"]
    report = init_from(dst, sd)
    assert "norm.weight" in report.missing
    assert "blocks.0.ls1.gamma" in report.unexpected and report.loaded


def _timm_file(tmp_path):
    import timm

    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_timm_name_with_a_local_file_resampled_to_patch_4(tmp_path):
    model, path = _timm_file(tmp_path)
    dst = _enc("vit_tiny_demo", 1, embed_dim=192, depth=12, num_heads=3)
    report = init_from(dst, "vit_tiny_patch16_224", file=path)
    assert report.source == "timm 'vit_tiny_patch16_224'"
    assert sorted(report.resampled) == ["patch_embed.proj.weight", "pos_embed"]
    assert torch.equal(dst.backbone.blocks[5].attn.qkv.weight, model.blocks[5].attn.qkv.weight)
    assert report.missing == [] and report.unexpected == []


def test_timm_name_from_the_hub_cache_only(tmp_path, monkeypatch):
    """Weights in the local Hub cache are used; a model not in it is an error naming it, never a download."""
    import huggingface_hub.constants as C

    model, path = _timm_file(tmp_path)
    cache = tmp_path / "hub"
    snap = cache / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(path.read_bytes())
    (cache / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "refs").mkdir()
    (cache / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    dst = _enc("vit_tiny_demo", 1, embed_dim=192, depth=12, num_heads=3)
    init_from(dst, "vit_tiny_patch16_224.augreg_in21k")
    assert torch.equal(dst.backbone.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.weight)
    with pytest.raises(FileNotFoundError, match="not in the local Hub cache"):
        init_from(dst, "vit_small_patch16_224.augreg_in21k")


def test_bad_sources(tmp_path):
    enc = _enc()
    with pytest.raises(FileNotFoundError, match="no such file, folder or timm model"):
        init_from(enc, tmp_path / "nothing.pth")
    with pytest.raises(TypeError, match="init_from source"):
        init_from(enc, 3)
    with pytest.raises(ValueError, match="no tensor this Beit can use"):
        init_from(enc, {"foo.weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="ConMIMEncoder"):
        init_from(enc.backbone, {})
    with pytest.raises(ValueError, match="which must be"):
        init_from(enc, {}, which="ema")
