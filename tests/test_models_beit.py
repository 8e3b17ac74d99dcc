"""The paper's network: timm Beit configured as the official ConMIM model, through ConMIMEncoder, the fused
loss, the k-NN monitor, conmim-train and conmim-export."""

import json
import math

import pytest
import torch

import conmim
from conmim import evaluate as E
from conmim import models as M
from conmim._validate import check_vit_backbone

OFFICIAL = ["beit_small_conmim", "beit_base_conmim", "beit_large_conmim"]
# (embed_dim, depth, heads, layer scale) of the official conmim_{small,base,large}_patch16_224
SIZES = {
    "beit_small_conmim": (384, 12, 6, 0.1),
    "beit_base_conmim": (768, 12, 12, 0.1),
    "beit_large_conmim": (1024, 24, 16, 1e-5),
}


def train_config(digits, out, **kw):
    """conmim-train's tiny_demo preset on the 32-digit folder, small and quiet, with ``kw`` on top."""
    from conmim import config as cfgmod

    over = dict(data=str(digits), out=str(out), batch_size=8, epochs=1, num_workers=0, loader="torch")
    over.update(progress=False, log_every=1, head_hidden=64, head_out=32, warmup_epochs=0.0, eval_every=0)
    over.update(kw)
    return cfgmod.resolve(cfgmod.TrainConfig, "tiny_demo", over)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return M.build_encoder("beit_tiny_demo", 64, 16)


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_layout(name):
    """Shared relative position bias, no absolute position embedding, no per-block tables, q/v biases without a
    learned k bias, layer scale, LayerNorm eps 1e-6 and a final norm on every token (built on the meta device:
    the layout, not the values)."""
    dim, depth, heads, ls = SIZES[name]
    with torch.device("meta"):
        enc = M.build_encoder(name)
    bb = enc.backbone
    assert type(bb).__name__ == "Beit" and enc.family == "beit"
    assert bb.pos_embed is None and bb.rel_pos_bias is not None
    assert bb.rel_pos_bias.relative_position_bias_table.shape == ((2 * 14 - 1) ** 2 + 3, heads)
    assert (bb.embed_dim, len(bb.blocks)) == (dim, depth)
    names = dict(bb.named_parameters())
    for i, block in enumerate(bb.blocks):
        assert block.attn.relative_position_bias_table is None
        assert block.attn.num_heads == heads and block.init_values == ls
        assert f"blocks.{i}.attn.q_bias" in names and f"blocks.{i}.attn.v_bias" in names
        assert f"blocks.{i}.attn.k_bias" not in names and block.attn.qkv.bias is None
        assert block.norm1.eps == 1e-6
    assert isinstance(bb.norm, torch.nn.LayerNorm) and bb.norm.eps == 1e-6
    assert bb.num_prefix_tokens == 1 and enc.num_patches == 196
    head = [m for m in enc.head.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(dim, 4096), (4096, 4096), (4096, 256)]


def test_official_init_values():
    """Truncated normal cut at one std (std 0.02), zero biases / q-v biases / relative table, layer scale at 0.1,
    output projections divided by sqrt(2 (i + 1)); the projector's Linear layers and the mask token too."""
    torch.manual_seed(0)
    enc = M.build_encoder("beit_tiny_demo", 256, 32)
    bb = enc.backbone
    sigma = 0.02 * 0.5376  # standard deviation of N(0, 0.02) truncated to [-0.02, 0.02]
    big = [bb.patch_embed.proj.weight, enc.head.net[3].weight]
    for block in bb.blocks:
        big += [block.attn.qkv.weight, block.mlp.fc1.weight]
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.v_bias == 0)
        assert torch.all(block.attn.proj.bias == 0) and torch.all(block.gamma_1 == 0.1)
    for w in big:
        assert w.abs().max() <= 0.02 and w.std().item() == pytest.approx(sigma, rel=0.05)
    for tok in (bb.cls_token, enc.mask_token):
        assert tok.abs().max() <= 0.02 and tok.abs().max() > 0
    assert torch.all(bb.rel_pos_bias.relative_position_bias_table == 0)
    for i, block in enumerate(bb.blocks):
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            scaled = w * math.sqrt(2 * (i + 1))
            assert scaled.abs().max() <= 0.02 + 1e-7 and scaled.std().item() == pytest.approx(sigma, rel=0.1)


def test_teacher_path_is_timms_forward_features():
    enc = _tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(enc.features(x), enc.backbone.forward_features(x), rtol=0, atol=0)


def test_masked_patches_see_the_mask_token_not_the_pixels():
    """A masked patch's pixels do not reach any output; an unmasked patch's do; the mask token does."""
    enc = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :20] = True  # patches 0..19: rows 0-1 and the first 4 of row 2 (8 x 8 grid, 4 px patches)
    y = x.clone()
    y[:, :, :4, :] += 5 * torch.randn(2, 3, 4, 32)  # row 0: masked patches only
    with torch.no_grad():
        base = enc.features(x, mask)
        torch.testing.assert_close(enc.features(y, mask), base, rtol=0, atol=0)
        z = x.clone()
        z[:, :, 28:, :] += 5  # last row: unmasked
        assert (enc.features(z, mask) - base).abs().max() > 1e-2
        enc.mask_token.add_(torch.randn_like(enc.mask_token))
        assert (enc.features(x, mask) - base).abs().max() > 1e-2


def test_check_vit_backbone_accepts_both_families_and_names_them():
    import timm

    assert check_vit_backbone(_tiny().backbone) == "beit"
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=0)
    assert check_vit_backbone(vit) == "vit"
    with pytest.raises(
        TypeError, match=r"VisionTransformer or Beit.*_pos_embed.*\(VisionTransformer\).*rel_pos_bias"
    ):
        conmim.ConMIMEncoder(torch.nn.Linear(2, 2))


def test_meta_build_then_load_assign_computes_the_buffers():
    """The trainer builds on the meta device and assigns a state dict: Beit's non-persistent buffers (relative
    position index, zero k bias) are in no state dict, and must be computed, not left on the meta device."""
    enc = _tiny().eval()
    with torch.device("meta"):
        plain = M.build_encoder("beit_tiny_demo", 64, 16)
    plain.load_state_dict(enc.state_dict(), assign=True)
    plain = plain.to("cpu").eval()
    x, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.4
    torch.testing.assert_close(plain(x, mask), enc(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fused_loss_trains_the_shared_table(backend):
    """Student and teacher outputs into the fused loss: its value matches the reference and the gradient reaches
    the shared relative position table and the mask token."""
    enc = _tiny()
    teacher = conmim.MomentumTeacher(enc)
    x = torch.randn(4, 3, 32, 32)
    mask = conmim.block_masks(
        4,
        grid=enc.grid,
        num_masking_patches=20,
        min_num_patches=4,
        generator=torch.Generator().manual_seed(0),
    )
    s, t = enc(x, mask), teacher(x)
    loss = conmim.FusedPatchContrastLoss(backend=backend)(s, t, mask)
    ref = conmim.patch_contrast_loss_reference(s.detach().double(), t.double(), mask)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert enc.backbone.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    assert enc.mask_token.grad.abs().sum() > 0


def test_knn_monitor_on_beit(labelled_digits):
    enc = _tiny()
    got = E.knn_monitor(conmim.MomentumTeacher(enc), str(labelled_digits), max_train=None, max_val=None)
    tr, va = E.labelled_split(labelled_digits)
    bb = enc.backbone.eval()
    ftr, fva = E.features(bb, tr.files, 32), E.features(bb, va.files, 32)
    assert got == pytest.approx(E.knn_top1(ftr, torch.tensor(tr.labels), fva, torch.tensor(va.labels)), abs=0)


@pytest.mark.slow
def test_train_and_export_beit(digits, labelled_digits, tmp_path, capsys):
    """conmim-train on the Beit demo model, then conmim-export: the printed timm call builds a Beit that gives
    the teacher's backbone tokens; conmim-eval reads the run and the exported file alike."""
    import timm

    from conmim import export as X
    from conmim import train as T
    from conmim.checkpoint import read_latest

    out = tmp_path / "run"
    T.train(train_config(digits, out, model="beit_tiny_demo", max_steps=3))
    assert X.main([str(out), "--out", str(tmp_path / "b.safetensors")]) == 0
    call = capsys.readouterr().out.splitlines()[-1].removeprefix("load it with: ")
    meta = json.loads((tmp_path / "b.safetensors.json").read_text())
    assert meta["timm_model"] == "beit_base_patch16_224" and meta["kwargs"]["use_shared_rel_pos_bias"] is True
    model = eval(call, {"timm": timm}).eval()
    state = read_latest(out)["teacher"]
    enc = M.build_encoder("beit_tiny_demo", 64, 32)
    enc.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), enc.eval().features(x), rtol=0, atol=0)
    from_run = E.evaluate("knn", str(out), str(labelled_digits))
    assert 0.0 <= from_run <= 1.0
    assert E.evaluate("knn", str(tmp_path / "b.safetensors"), str(labelled_digits)) == from_run
    # the run folder as a starting point: its teacher's backbone, the mask token and head fresh
    fresh = M.build_encoder("beit_tiny_demo", 64, 32)
    report = M.init_from(fresh, out)
    assert report.missing == [] and report.unexpected == [] and "(teacher)" in report.source
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(v, enc.backbone.state_dict()[k]), k
    assert not torch.equal(fresh.mask_token, enc.mask_token)


_SHARDED = """
import os, socket, torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from conmim import FusedPatchContrastLoss, block_masks, models as M, parallel as P
torch.manual_seed(0)
enc = M.build_encoder("beit_tiny_demo", 64, 16)
ref = M.build_encoder("beit_tiny_demo", 64, 16)
ref.load_state_dict(enc.state_dict())
run = P.Sharded(enc, torch.device("cpu"), dict(base_momentum=0.99, final_momentum=1.0, total_steps=4),
                precision="fp32", grad_checkpointing=True)
x = torch.randn(4, 3, 32, 32)
m = block_masks(4, grid=(8, 8), num_masking_patches=20, min_num_patches=4, generator=torch.Generator().manual_seed(0))
FusedPatchContrastLoss()(run.student(x, m), run.teacher(x), m).backward()
FusedPatchContrastLoss()(ref(x, m), ref(x).detach(), m).backward()
g = run.student.backbone.rel_pos_bias.relative_position_bias_table.grad.full_tensor()
torch.testing.assert_close(g, ref.backbone.rel_pos_bias.relative_position_bias_table.grad)
plain = run.eval_model()  # a meta-device copy loaded with assign=True: the relative index must be computed
with torch.no_grad():
    torch.testing.assert_close(plain.eval().features(x), ref.eval().features(x))
print("sharded ok")
"""


@pytest.mark.slow
def test_sharded_with_checkpointed_blocks():
    """FSDP2 on a one-rank gloo group (in a subprocess: a process group per test process) with activation
    checkpointing: the shared table's gradient equals the unsharded one, and the gathered teacher computes."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "sharded ok" in done.stdout, done.stderr[-3000:]
