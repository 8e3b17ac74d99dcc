"""conmim-import against an independent model of the official network.

The official ConMIM pretraining model (BEiT layout), written here from its description, not from its code:
patch embedding (a conv with stride = patch), masked patches blended with the mask token, [CLS] prepended, no
absolute position embedding; a relative position bias [heads, N+1, N+1] looked up from one table shared by every
block (entries for the (2W-1)^2 spatial offsets, then cls->patch, patch->cls and cls->cls); pre-norm blocks
(LayerNorm eps 1e-6) with attention whose qkv bias is (q_bias, 0, v_bias), softmax(q k^T / sqrt(d) + bias),
layer-scaled residuals gamma_1, gamma_2, a GELU MLP; a final LayerNorm; the projector Linear-BN-ReLU-Linear-BN-
ReLU-Linear-BN(no affine) over every token with batch statistics (train mode). The fine-tuned model: the same
with a table per block, no final norm, mean of patch tokens, fc_norm, head.

Checkpoints are built here with the official key names and random values; nothing is downloaded.
"""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conmim import importer as I
from conmim import models as M

DIM, DEPTH, HEADS, W, P, HID, OUT = 32, 2, 4, 4, 4, 24, 8  # 16 px images, a 4 x 4 grid
S = W * P


def rel_index(w: int) -> torch.Tensor:
    """[w*w+1, w*w+1] indices into a table of (2w-1)^2 + 3 rows: spatial offset (dy, dx) -> (dy + w - 1) *
    (2w - 1) + (dx + w - 1); then one row each for cls->patch, patch->cls, cls->cls."""
    n = (2 * w - 1) ** 2
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    idx = torch.empty(w * w + 1, w * w + 1, dtype=torch.long)
    idx[1:, 1:] = (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    idx[0, :] = n
    idx[:, 0] = n + 1
    idx[0, 0] = n + 2
    return idx


def official_state(seed=0, finetuned=False, classes=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s
    sd = {
        "cls_token": r(1, 1, DIM),
        "patch_embed.proj.weight": r(DIM, 3, P, P),
        "patch_embed.proj.bias": r(DIM),
    }
    table = lambda: r((2 * W - 1) ** 2 + 3, HEADS, s=0.5)
    if not finetuned:
        sd["mask_token"] = r(1, 1, DIM)
        sd["rel_pos_bias.relative_position_bias_table"] = table()
        sd["rel_pos_bias.relative_position_index"] = rel_index(W)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "gamma_1": r(DIM, s=0.5), b + "gamma_2": r(DIM, s=0.5),
            b + "norm1.weight": 1 + r(DIM), b + "norm1.bias": r(DIM),
            b + "attn.q_bias": r(DIM), b + "attn.v_bias": r(DIM), b + "attn.qkv.weight": r(3 * DIM, DIM),
            b + "attn.proj.weight": r(DIM, DIM), b + "attn.proj.bias": r(DIM),
            b + "norm2.weight": 1 + r(DIM), b + "norm2.bias": r(DIM),
            b + "mlp.fc1.weight": r(4 * DIM, DIM), b + "mlp.fc1.bias": r(4 * DIM),
            b + "mlp.fc2.weight": r(DIM, 4 * DIM), b + "mlp.fc2.bias": r(DIM),
        })  # fmt: skip
        if finetuned:
            sd[b + "attn.relative_position_bias_table"] = table()
            sd[b + "attn.relative_position_index"] = rel_index(W)
    if finetuned:
        sd.update({"fc_norm.weight": 1 + r(DIM), "fc_norm.bias": r(DIM)})
        sd.update({"head.weight": r(classes, DIM), "head.bias": r(classes)})
        return sd
    sd.update({"norm.weight": 1 + r(DIM), "norm.bias": r(DIM)})
    sd.update({"lm_head.weight": r(8192, DIM), "lm_head.bias": r(8192)})
    for j, (i, o) in zip((0, 3, 6), ((DIM, HID), (HID, HID), (HID, OUT))):
        sd[f"projectors.{j}.weight"] = r(o, i)
        bn = f"projectors.{j + 1}."
        sd.update({bn + "running_mean": r(o), bn + "running_var": 1 + r(o).abs(), bn + "num_batches_tracked": torch.tensor(7)})  # fmt: skip
        if j < 6:
            sd.update({bn + "weight": 1 + r(o), bn + "bias": r(o)})
    return sd


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def _bn_train(x, w=None, b=None):
    mu, var = x.mean(0), x.var(0, unbiased=False)
    y = (x - mu) / torch.sqrt(var + 1e-5)
    return y if w is None else y * w + b


def official_tokens(sd, images, mask=None, per_block=False):
    """Backbone tokens [B, 1 + N, D] before any final norm."""
    B = images.shape[0]
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2)  # [B, N, D], patches row by row
    if mask is not None:
        m = mask[..., None].float()
        x = x * (1 - m) + sd["mask_token"] * m
    x = torch.cat([sd["cls_token"].expand(B, 1, DIM), x], 1)
    T, hd = x.shape[1], DIM // HEADS
    idx = rel_index(W).flatten()
    for i in range(DEPTH):
        b = f"blocks.{i}."
        tab = (
            sd[b + "attn.relative_position_bias_table"]
            if per_block
            else sd["rel_pos_bias.relative_position_bias_table"]
        )
        bias = tab[idx].view(T, T, HEADS).permute(2, 0, 1)
        h = _ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv_b = torch.cat([sd[b + "attn.q_bias"], torch.zeros(DIM), sd[b + "attn.v_bias"]])
        q, k, v = (h @ sd[b + "attn.qkv.weight"].T + qkv_b).view(B, T, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, -1)
        o = (a @ v).transpose(1, 2).reshape(B, T, DIM) @ sd[b + "attn.proj.weight"].T + sd[
            b + "attn.proj.bias"
        ]
        x = x + sd[b + "gamma_1"] * o
        h = _ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + sd[b + "gamma_2"] * (h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"])
    return x


def official_pretrain(sd, images, mask):
    """The pretraining model in train mode: projected patch features [B, N, OUT] (CLS dropped)."""
    x = _ln(official_tokens(sd, images, mask), sd["norm.weight"], sd["norm.bias"])
    B, T, _ = x.shape
    y = x.reshape(B * T, DIM)
    for j in (0, 3):
        y = y @ sd[f"projectors.{j}.weight"].T
        y = torch.relu(_bn_train(y, sd[f"projectors.{j + 1}.weight"], sd[f"projectors.{j + 1}.bias"]))
    y = _bn_train(y @ sd["projectors.6.weight"].T)
    return y.view(B, T, -1)[:, 1:]


def official_finetuned_logits(sd, images):
    x = official_tokens(sd, images, per_block=True)
    return (
        _ln(x[:, 1:].mean(1), sd["fc_norm.weight"], sd["fc_norm.bias"]) @ sd["head.weight"].T
        + sd["head.bias"]
    )


def _args(**kw):
    return argparse.Namespace(
        model="conmim_base_patch16_224",
        input_size=S,
        layer_scale_init_value=0.1,
        imagenet_default_mean_and_std=False,
        **kw,
    )


def _save(path, sd, epoch=299):
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch,
                "scaler": {"scale": 65536.0}, "args": _args(temp=0.1)}, path)  # fmt: skip
    return path


def _json(path):
    with open(path) as f:
        return json.load(f)


def _encoder(meta_path):
    spec = _json(meta_path)
    return M.build_encoder(spec["model"], spec["head_hidden"], spec["head_out"], **spec["kwargs"])


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, S, S, generator=g)
    mask = torch.rand(3, W * W, generator=g) < 0.5
    return x, mask


@pytest.mark.parametrize("file", ["checkpoint-299.pth", "checkpoint_copy-299.pth"])
def test_imported_encoder_matches_the_official_forward(tmp_path, images, file):
    """Student (mask token in place) and teacher (no mask): the imported ConMIMEncoder, loaded strictly, gives the
    official model's projected patch features."""
    x, mask = images
    sd = official_state()
    meta = I.import_checkpoint(_save(tmp_path / file, sd), tmp_path / "conmim.safetensors")
    assert meta["which"] == ("teacher" if "_copy" in file else "student") and meta["epoch"] == 299
    assert sorted(meta["dropped"]) == [
        "lm_head.bias",
        "lm_head.weight",
        "rel_pos_bias.relative_position_index",
    ]
    enc = _encoder(meta["encoder"] + ".json")
    from safetensors.torch import load_file

    enc.load_state_dict(load_file(meta["encoder"]), strict=True)
    enc.train()
    with torch.no_grad():
        if "_copy" in file:
            got, want = enc(x), official_pretrain(sd, x, torch.zeros_like(mask))
        else:
            got, want = enc(x, mask), official_pretrain(sd, x, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - official_pretrain(sd, x, ~mask)).abs().max() > 1e-2  # the mask matters


def test_timm_file_and_export_round_trip_give_the_official_tokens(tmp_path, images):
    """The timm-layout file (shared table expanded per block) through its printed load call, and the encoder
    file through init_from and conmim-export's backbone_state / load_call: same tokens as the official model."""
    import timm
    from safetensors.torch import save_file

    from conmim import export as X

    x, _ = images
    sd = official_state()
    meta = I.import_checkpoint(_save(tmp_path / "checkpoint_copy-9.pth", sd), tmp_path / "t.safetensors")
    want = _ln(official_tokens(sd, x), sd["norm.weight"], sd["norm.bias"])
    model = eval(meta["load"], {"timm": timm}).eval()
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # the script's default normalisation (no flag)
    assert model.rel_pos_bias is None and model.blocks[1].attn.relative_position_bias_table is not None
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), want, rtol=1e-5, atol=1e-5)
    saved = json.loads((tmp_path / "t.safetensors.json").read_text())
    assert set(saved) >= {"timm_model", "kwargs", "step", "which", "load"} and saved["load"] == meta["load"]

    enc = _encoder(meta["encoder"] + ".json")
    from_timm_file = M.init_from(
        enc, tmp_path / "t.safetensors"
    )  # per-block copies back into the shared table
    assert from_timm_file.missing == [] and from_timm_file.unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(enc.eval().features(x), want, rtol=1e-5, atol=1e-5)
    enc = _encoder(meta["encoder"] + ".json")
    report = M.init_from(enc, meta["encoder"])
    assert report.missing == [] and report.unexpected == []
    spec = _json(meta["encoder"] + ".json")
    timm_name, kwargs = M.model_spec(spec["model"])
    kwargs.update(spec["kwargs"])
    path = tmp_path / "exported.safetensors"
    save_file(X.backbone_state(enc.state_dict()), str(path))
    again = eval(X.load_call({"timm_model": timm_name, "kwargs": kwargs}, path), {"timm": timm}).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_finetuned_model_gives_the_official_logits(tmp_path, images, wrapper):
    import timm

    x, _ = images
    sd = official_state(finetuned=True)
    torch.save({wrapper: sd}, tmp_path / "conmim_ft.pth")
    meta = I.import_checkpoint(tmp_path / "conmim_ft.pth", tmp_path / "ft.safetensors")
    assert meta["which"] == "fine-tuned" and meta["encoder"] is None and "num_classes=5" in meta["load"]
    model = eval(meta["load"], {"timm": timm}).eval()
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # the README's fine-tuning command's
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_finetuned_logits(sd, x), rtol=1e-5, atol=1e-5)


def test_every_key_is_mapped_or_reported(tmp_path):
    sd = official_state()
    sd["decoder.weight"] = torch.zeros(3)
    with pytest.raises(I.LayoutError, match=r"1 keys have no place.*decoder\.weight"):
        I.import_checkpoint(_save(tmp_path / "checkpoint-1.pth", sd), tmp_path / "o.safetensors")
    sd = official_state()
    sd["rel_pos_bias.relative_position_index"] = rel_index(W).flip(0)
    with pytest.raises(I.LayoutError, match="not the standard BEiT relative position index"):
        I.import_checkpoint(_save(tmp_path / "checkpoint-2.pth", sd), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_refuses_pickled_objects_and_bad_arguments(tmp_path, capsys):
    bad = tmp_path / "checkpoint-3.pth"
    torch.save({"model": official_state(), "args": torch.nn.Linear(1, 1)}, bad)
    assert I.main([str(bad), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "not unpickled" in capsys.readouterr().err
    assert I.main([str(tmp_path / "none.pth"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    good = _save(tmp_path / "checkpoint-4.pth", official_state())
    assert I.main([str(good), "--out", str(tmp_path / "o.pth")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert I.main([str(good), "--out", str(tmp_path / "o.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "student network of epoch 299" in printed and "lm_head.weight" in printed
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".pth") == [
        "o.encoder.safetensors", "o.encoder.safetensors.json", "o.safetensors", "o.safetensors.json",
    ]  # fmt: skip


def test_index_used_by_the_reference_is_timms():
    """The test's own relative index (written from the description) agrees with the one timm computes."""
    from timm.models.beit import gen_relative_position_index

    assert torch.equal(rel_index(W), gen_relative_position_index((W, W)))
