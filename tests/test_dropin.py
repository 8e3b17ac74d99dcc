"""The drop-in API: ConMIMEncoder around a user's timm ViT, the teacher's targets, both at the top level."""

import pytest
import torch
from torch import nn

import conmim

B, S, P = 3, 24, 4  # batch, image side, patch side: a 6 x 6 grid
N = (S // P) ** 2


def _vit(**kw):
    import timm

    args = dict(img_size=S, patch_size=P, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)  # with its 1000-class head, as a user creates it


def _masks(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return torch.zeros(B, N, dtype=torch.bool)
    if kind == "full":
        return torch.ones(B, N, dtype=torch.bool)
    if kind == "ragged":  # 0, some and all patches masked in one batch
        m = torch.rand(B, N, generator=g) < 0.5
        m[0] = False
        m[2] = True
        return m
    return conmim.block_masks(
        B, grid=(S // P, S // P), num_masking_patches=12, min_num_patches=4, generator=g
    )


def test_top_level_exports():
    for name in (
        "ConMIMEncoder",
        "MomentumTeacher",
        "FusedPatchContrastLoss",
        "block_masks",
        "build_encoder",
    ):
        assert name in conmim.__all__ and hasattr(conmim, name)


def test_encoder_drops_the_classifier_and_gives_the_grid():
    vit = _vit()
    assert vit.num_classes == 1000
    enc = conmim.ConMIMEncoder(vit, hidden=64, out=16)
    assert vit.num_classes == 0 and not any(n.startswith("backbone.head.") for n, _ in enc.named_parameters())
    assert enc.grid == (S // P, S // P) and enc.num_patches == N


VITS = {
    "plain": {},
    "dynamic_img_size": dict(dynamic_img_size=True),  # patch embeddings come as [B, H, W, D]
    "registers": dict(
        reg_tokens=2, no_embed_class=True
    ),  # 3 prefix tokens, position embedding on patches only
}


@pytest.mark.parametrize("vit", sorted(VITS))
@pytest.mark.parametrize("kind", ["none", "block", "ragged", "full"])
def test_masked_pixels_never_reach_the_output(kind, vit):
    """Where the mask is True the patch is replaced by the mask token: rewriting those pixels changes nothing,
    rewriting one visible patch changes the output."""
    torch.manual_seed(0)
    enc = conmim.ConMIMEncoder(_vit(**VITS[vit]), hidden=64, out=16)
    mask = _masks(kind)
    x = torch.randn(B, 3, S, S)
    out = enc(x, mask)
    assert out.shape == (B, N, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    pix = mask.view(B, 1, S // P, 1, S // P, 1).expand(B, 3, S // P, P, S // P, P).reshape(B, 3, S, S)
    noisy = torch.where(pix, torch.randn_like(x) * 5, x)
    torch.testing.assert_close(enc(noisy, mask), out, rtol=0, atol=0)
    visible = (~mask).nonzero()
    if len(visible):
        b, n = visible[0].tolist()
        r, c = divmod(n, S // P)
        poked = x.clone()
        poked[b, :, r * P : (r + 1) * P, c * P : (c + 1) * P] += 3.0
        assert not torch.equal(enc(poked, mask), out)


def test_no_mask_equals_an_empty_mask():
    torch.manual_seed(0)
    enc = conmim.ConMIMEncoder(_vit(), hidden=64, out=16)
    x = torch.randn(B, 3, S, S)
    torch.testing.assert_close(enc(x), enc(x, _masks("none")), rtol=0, atol=0)


def test_teacher_call_gives_patch_features_through_the_head():
    torch.manual_seed(0)
    enc = conmim.ConMIMEncoder(_vit(), hidden=64, out=16)
    teacher = conmim.MomentumTeacher(enc, total_steps=10)
    x = torch.randn(B, 3, S, S)
    with torch.no_grad():
        target = teacher(x)
        expected = enc(x)
    assert target.shape == (B, N, 16)
    torch.testing.assert_close(target, expected)
    loss = conmim.FusedPatchContrastLoss()(enc(x, _masks("block")), target, _masks("block"))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("mask", "exc", "words"),
    [
        (torch.zeros(B, N, dtype=torch.uint8), TypeError, "bool"),
        (torch.zeros(B, N + 1, dtype=torch.bool), ValueError, f"[{B}, {N}]"),
        (torch.zeros(B * N, dtype=torch.bool), ValueError, "shape [B, N]"),
        ([[True] * N] * B, TypeError, "bool tensor"),
    ],
)
def test_bad_mask_is_named(mask, exc, words):
    enc = conmim.ConMIMEncoder(_vit(), hidden=64, out=16)
    with pytest.raises(exc, match="mask") as info:
        enc(torch.randn(B, 3, S, S), mask)
    assert words in str(info.value)


@pytest.mark.parametrize("backbone", [nn.Linear(4, 4), "vit_tiny_patch16_224"])
def test_non_vit_backbone_is_named(backbone):
    with pytest.raises(TypeError, match="backbone must be a timm"):
        conmim.ConMIMEncoder(backbone)
