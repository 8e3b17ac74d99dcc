"""conmim-finetune: the recipe's parts against the official numbering and values, initialisation from every
source, the labelled subset, exact resume and the run folder. Tiny networks and images on the CPU."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conmim import config as cfgmod
from conmim.checkpoint import CheckpointManager
from conmim.finetune import recipe, run
from conmim.finetune.config import ConfigError, FinetuneConfig
from conmim.finetune.data import class_subset

DEPTH = 4  # vit_tiny_demo


def cfg_for(**kw) -> FinetuneConfig:
    base = dict(init="none", model="vit_tiny_demo", image_size=16, progress=False, num_workers=0,
                precision="fp32", batch_size=4, epochs=2, warmup_epochs=0.5, lr_batch=4, log_every=1)  # fmt: skip
    return cfgmod.resolve(FinetuneConfig, "official", base | kw)


def tiny_classifier(cfg=None, num_classes=5, seed=0):
    cfg = cfg or cfg_for()
    return recipe.build_classifier(recipe.resolve_init(cfg), num_classes, cfg, seed)


def beit_layer_id(name: str, depth: int) -> int:
    """BEiT's numbering, written out independently of timm's group matcher."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/ with 3 classes of 16 px PNGs, each class its own mean colour plus noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("labelled")
    g = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((16, 16, 3)) + 80 * c
                img = np.clip(base + g.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ the recipe
@pytest.mark.parametrize("decay", [0.65, 0.8])
def test_layer_decay_groups_follow_beit_numbering(decay):
    cfg = cfg_for(layer_decay=decay, weight_decay=0.05)
    model = tiny_classifier(cfg)
    opt = recipe.make_optimizer(model, cfg, lr=1e-3)
    sched = recipe.make_scheduler(opt, cfg, total_steps=100, warmup_steps=10)
    sched.step_update(55)
    base = max(g["lr"] for g in opt.param_groups)  # the head's group: scale 1
    expect = cfg.min_lr + (1e-3 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    assert base == pytest.approx(expect, rel=1e-12)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)
    seen_layers = set()
    for name, p in names.items():
        g, layer = group_of[id(p)], beit_layer_id(name, DEPTH)
        seen_layers.add(layer)
        assert g["lr"] == pytest.approx(base * decay ** (DEPTH + 1 - layer), rel=1e-12), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen_layers == set(range(DEPTH + 2))


def test_warmup_starts_at_zero_and_ends_at_min_lr():
    cfg = cfg_for(layer_decay=1.0)
    opt = recipe.make_optimizer(tiny_classifier(cfg), cfg, lr=2e-3)
    sched = recipe.make_scheduler(opt, cfg, total_steps=50, warmup_steps=10)
    lrs = []
    for s in (0, 5, 10, 50):
        sched.step_update(s)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(2e-3)
    assert lrs[3] == pytest.approx(cfg.min_lr)


def test_linear_lr_scaling():
    cfg = cfgmod.resolve(FinetuneConfig, "official", {"batch_size": 64, "accum_steps": 2})
    assert recipe.peak_lr(cfg, world=4) == pytest.approx(4e-3 * 512 / 1024)


def test_mixup_targets_are_smoothed_distributions():
    cfg = cfg_for()
    k, n = 7, 16
    mix = recipe.make_mixup(cfg, k)
    x = torch.randn(n, 3, 16, 16)
    y = torch.randint(0, k, (n,))
    np.random.seed(3)
    xm, t = mix(x.clone(), y)
    assert t.shape == (n, k)
    torch.testing.assert_close(t.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    off = cfg.smoothing / k
    assert t.min() >= off - 1e-7
    # a blend of two smoothed one-hots: lam on y, 1 - lam on y flipped over the batch
    onehot = lambda v: torch.full((n, k), off).scatter_(1, v[:, None], 1 - cfg.smoothing + off)
    lam = ((t - onehot(y.flip(0))) / (onehot(y) - onehot(y.flip(0)))).nan_to_num(nan=0.0)
    lam = lam[onehot(y) != onehot(y.flip(0))]
    assert lam.numel() and torch.allclose(lam, lam[0]) and 0 <= lam[0] <= 1
    assert not torch.equal(xm, x)
    assert isinstance(recipe.make_criterion(cfg, mix), __import__("timm").loss.SoftTargetCrossEntropy)
    plain = dataclasses.replace(cfg, mixup=0.0, cutmix=0.0)
    assert recipe.make_mixup(plain, k) is None
    crit = recipe.make_criterion(plain, None)
    logits = torch.randn(n, k)
    smooth = (1 - cfg.smoothing) * torch.nn.functional.one_hot(y, k) + cfg.smoothing / k
    want = -(smooth * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(crit(logits, y), want)


def test_classifier_head_pooling_and_drop_path():
    model = tiny_classifier(cfg_for(drop_path=0.1, init_scale=0.001), num_classes=10)
    assert model.global_pool == "avg"
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    head = model.get_classifier()
    assert head.out_features == 10 and torch.count_nonzero(head.bias) == 0
    assert 0 < head.weight.std().item() < 0.02 * 0.001 * 1.2
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1)


def test_transforms_use_randaugment_and_erasing():
    train, val = recipe.make_transforms(cfg_for(), 32)
    text = repr(train)
    assert "RandAugment" in text and "RandomErasing" in text and "bicubic" in text.lower()
    from PIL import Image

    img = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    assert train(img).shape == (3, 32, 32) and val(img).shape == (3, 32, 32)


def test_randaugment_posterize_at_full_magnitude():
    """'inc1' at magnitude 10 keeps 0 bits; Pillow 13 refuses that, older Pillow (the official runs) gave black."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    recipe.make_transforms(cfg_for(), 16)
    policy = rand_augment_transform("rand-n1-m10-mstd0-inc1", {})
    op = next(o for o in policy.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    img = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0


# ----------------------------------------------------------------------------------------------- initialise
def _encoder_state(seed):
    from conmim.models import build_encoder

    torch.manual_seed(seed)
    return build_encoder("vit_tiny_demo", head_hidden=16, head_out=8, img_size=16).state_dict()


def _run_folder(tmp_path) -> Path:
    """A pretraining run folder in conmim-train's format: config.yaml and one verified checkpoint."""
    import yaml

    from conmim.models import build_encoder

    run_dir = tmp_path / "pretrain"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"model": "vit_tiny_demo", "image_size": 16, "patch_size": 4})
    )
    nets = {}
    for name, seed in (("student", 1), ("teacher", 2)):
        nets[name] = build_encoder("vit_tiny_demo", head_hidden=16, head_out=8, img_size=16)
        nets[name].load_state_dict(_encoder_state(seed))
    CheckpointManager(run_dir, log=lambda m: None).save(nets, {"epoch": 1, "batch": 0, "step": 7}, 1, 7, True)
    return run_dir


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_init_from_run_folder(tmp_path, which):
    run_dir = _run_folder(tmp_path)
    cfg = cfg_for(init=str(run_dir), model=None, image_size=None, which=which)
    init = recipe.resolve_init(cfg)
    assert init.kwargs["img_size"] == 16 and init.source == str(run_dir)
    model = recipe.build_classifier(init, 3, cfg, 0)
    want = _encoder_state(2 if which == "teacher" else 1)
    for key, value in model.state_dict().items():
        if f"backbone.{key}" in want:
            assert torch.equal(value, want[f"backbone.{key}"]), key
    assert not any(k.startswith(("head.", "fc_norm.")) for k in init.weights)
    assert "norm.weight" in init.weights  # the pretraining's final norm: dropped, fc_norm is new


def test_init_from_exported_file_and_bad_inputs(tmp_path):
    from safetensors.torch import save_file

    from conmim.export import backbone_state

    weights = backbone_state(_encoder_state(5))
    path = tmp_path / "bb.safetensors"
    save_file(weights, str(path))
    with pytest.raises(FileNotFoundError, match="sidecar"):
        recipe.resolve_init(cfg_for(init=str(path), model=None, image_size=None))
    kwargs = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    Path(str(path) + ".json").write_text(json.dumps({"timm_model": "vit_tiny_patch16_224", "kwargs": kwargs}))
    cfg = cfg_for(init=str(path), model=None, image_size=None)
    model = recipe.build_classifier(recipe.resolve_init(cfg), 3, cfg, 0)
    assert torch.equal(model.blocks[2].mlp.fc1.weight, weights["blocks.2.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="patch_size 8 differs"):
        recipe.resolve_init(cfg_for(init=str(path), model=None, image_size=None, patch_size=8))
    with pytest.raises(FileNotFoundError, match="neither"):
        recipe.resolve_init(cfg_for(init=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="needs model"):
        recipe.resolve_init(cfg_for(model=None))
    bad = dict(weights)
    bad["blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        recipe.load_backbone_weights(model, bad)


def test_another_image_size_resamples_the_position_tables(tmp_path):
    """Pretrained at 16 px (a 4 x 4 grid), fine-tuned at 24 px (6 x 6): timm's resampling of the absolute
    position embedding (class token kept) and of BEiT's relative position tables, and a network that runs."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    from conmim.export import backbone_state

    weights = backbone_state(_encoder_state(5))
    path = tmp_path / "bb.safetensors"
    save_file(weights, str(path))
    kwargs = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    Path(str(path) + ".json").write_text(json.dumps({"timm_model": "vit_tiny_patch16_224", "kwargs": kwargs}))
    cfg = cfg_for(init=str(path), model=None, image_size=24)
    messages = []
    model = recipe.build_classifier(recipe.resolve_init(cfg, messages.append), 3, cfg, 0)
    assert any("resampled" in m for m in messages)
    assert model.pos_embed.shape[1] == 1 + 36
    want = resample_abs_pos_embed(weights["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed, want)
    assert torch.equal(model.pos_embed[:, 0], weights["pos_embed"][:, 0])
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 3)

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False,
              use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1)  # fmt: skip
    torch.manual_seed(0)
    pre = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **kw)
    table = pre.state_dict()["rel_pos_bias.relative_position_bias_table"]
    beit = recipe.build_classifier(
        recipe.Init("beit_base_patch16_224", kw | {"img_size": 24}, pre.state_dict(), "test"), 4, cfg, 0
    )
    own = beit.blocks[0].attn.relative_position_bias_table
    assert own.shape != table.shape
    want = resize_rel_pos_bias_table(table, new_window_size=(6, 6), new_bias_shape=own.shape)
    for blk in beit.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, want)
    assert beit(torch.randn(2, 3, 24, 24)).shape == (2, 4)


def test_beit_shared_relative_position_table_expanded_per_block():
    import timm

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, use_abs_pos_emb=False,
              use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1)  # fmt: skip
    torch.manual_seed(0)
    pre = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **kw)
    weights = pre.state_dict()
    init = recipe.Init("beit_base_patch16_224", kw, weights, "test")
    cfg = cfg_for()
    model = recipe.build_classifier(init, 4, cfg, 0)
    table = weights["rel_pos_bias.relative_position_bias_table"]
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, table)
    opt = recipe.make_optimizer(model, cfg, 1.0)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert group_of[id(p)]["lr_scale"] == pytest.approx(0.65 ** (2 + 1 - beit_layer_id(name, 2))), name


# ---------------------------------------------------------------------------------------------------- config
def test_config_presets_and_errors():
    official = cfgmod.resolve(FinetuneConfig, "official")
    assert official == FinetuneConfig()  # the preset states the defaults
    assert cfgmod.resolve(FinetuneConfig) == official
    demo = cfgmod.resolve(FinetuneConfig, "cpu_demo")
    assert demo.data == "samples:mnist" and demo.train_fraction < 1
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        cfgmod.resolve(FinetuneConfig, None, {"lrr": 1})
    with pytest.raises(ConfigError, match="'layer_decay' must be a number in"):
        cfgmod.resolve(FinetuneConfig, None, {"layer_decay": 1.5})
    with pytest.raises(ConfigError, match="'precision' must be one of"):
        cfgmod.resolve(FinetuneConfig, None, {"precision": "fp8"})
    with pytest.raises(ConfigError, match="batch_size must be even"):
        cfgmod.resolve(FinetuneConfig, None, {"batch_size": 3})
    args = vars(run.parser().parse_args(["--config", "cpu_demo", "--lr", "3e-3", "--init", "none"]))
    cfg = cfgmod.resolve(FinetuneConfig, args.pop("config"), args)
    assert cfg.lr == 3e-3 and cfg.init == "none" and cfg.train_fraction == 0.1


def test_class_subset_per_class_and_seeded():
    labels = [i % 4 for i in range(400)]
    a = class_subset(labels, 0.1, seed=0)
    assert len(a) == 40 and all(sum(labels[i] == c for i in a) == 10 for c in range(4))
    assert a == class_subset(labels, 0.1, seed=0) != class_subset(labels, 0.1, seed=1)
    assert class_subset(labels, 1.0, 0) == list(range(400))
    assert len(class_subset([0, 1, 1, 1], 0.01, 0)) == 2  # at least one per class


# ------------------------------------------------------------------------------------------------ the loop
def _final(out: Path, cfg: FinetuneConfig) -> dict:
    """The newest checkpoint's run state and weights (loaded into a fresh classifier)."""
    model = tiny_classifier(cfg, num_classes=3, seed=123)
    state = CheckpointManager(out, log=lambda m: None).load_latest({"model": model})
    return state | {"model": model.state_dict()}


DALI = pytest.mark.skipif(
    __import__("conmim.data.dali_loader", fromlist=["dali_status"]).dali_status() is not None,
    reason="NVIDIA DALI is not installed (pip install -e '.[dali]')",
)


@pytest.mark.parametrize(
    "strategy,precision,loader",
    [("ddp", "fp32", "torch"), ("ddp", "fp16", "torch"), ("fsdp", "fp32", "torch"),
     pytest.param("ddp", "fp32", "dali", marks=DALI)],
)  # fmt: skip
def test_resume_after_crash_is_bit_identical(folder, tmp_path, monkeypatch, strategy, precision, loader):
    common = dict(data=str(folder), epochs=3, checkpoint_every=2, keep_last=10, batch_size=8, lr_batch=8,
                  precision=precision, strategy=strategy, loader=loader, num_workers=1 if loader == "dali" else 0)  # fmt: skip
    whole = run.train(cfg_for(out=str(tmp_path / "whole"), **common))
    calls = {"n": 0}
    real = run.train_step

    def crash_at_5(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:  # mid-epoch 2 (3 steps per epoch), after the step-4 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(run, "train_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        run.train(cfg_for(out=str(tmp_path / "cut"), **common))
    monkeypatch.setattr(run, "train_step", real)
    assert not (tmp_path / "cut" / run.RESULTS).exists()
    resumed = run.train(cfg_for(out=str(tmp_path / "cut"), **common))
    a, b = _final(tmp_path / "whole", cfg_for(**common)), _final(tmp_path / "cut", cfg_for(**common))
    assert a["step"] == b["step"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["evals"] == b["evals"] and whole == resumed
    # the replayed step is logged again, none is missing
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "loss" in r} == set(range(1, 10))


def test_cli_run_folder_results_and_baseline(folder, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["--config", "official", "--init", "none", "--model", "vit_tiny_demo", "--image_size", "16",
            "--data", str(folder), "--out", str(out), "--epochs", "1", "--batch_size", "4", "--num_workers", "0",
            "--precision", "fp32", "--progress", "false", "--baseline", "true", "--train_fraction", "0.5",
            "--warmup_epochs", "0.5"]  # fmt: skip
    assert run.main(args) == 0
    res = json.loads((out / run.RESULTS).read_text())
    assert res["mode"] == "finetune" and res["source"] == "none" and res["data"] == str(folder)
    for key in ("top1", "top5", "best_top1", "top1_random_init", "top5_random_init"):
        assert 0 <= res[key] <= 1, key
    assert res["top5"] >= res["top1"] and res["epochs"] == 1 and res["train_images"] == 12
    assert (out / "config.yaml").is_file() and (out / "scratch" / run.RESULTS).is_file()
    assert (out / "loss_curve.png").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("top1" in r and "best_top1" in r for r in rows) and any("loss" in r for r in rows)
    assert "fine-tuned top-1" in capsys.readouterr().out


def test_grad_checkpointing_and_bf16(folder, tmp_path):
    cfg = cfg_for(data=str(folder), out=str(tmp_path / "x"), drop_path=0.0, grad_checkpointing=True)
    r = run.build_run(dataclasses.replace(cfg, precision="bf16"), 0, 1, torch.device("cpu"))
    assert all(
        isinstance(b.forward, functools.partial) for b in r.net.blocks
    )  # conmim.parallel's checkpointing
    assert r.autocast.fast_dtype == torch.bfloat16
    assert not (tmp_path / "x").exists()
    plain = tiny_classifier(dataclasses.replace(cfg, grad_checkpointing=False), num_classes=3)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    for net in (r.net, plain):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    for (name, a), b in zip(r.net.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    with r.autocast:
        out = r.net(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fsdp_in_one_process_trains_as_ddp_does(folder, tmp_path, monkeypatch):
    """The same run under both strategies (conmim.parallel's objects) in one process ends with the same weights
    to float rounding, either's checkpoint loads into a plain classifier, and a run cut under ddp resumes under
    fsdp."""
    common = dict(data=str(folder), epochs=2, batch_size=8, lr_batch=8, drop_path=0.0, checkpoint_every=1)
    finals = {}
    for strategy in ("ddp", "fsdp"):
        cfg = cfg_for(out=str(tmp_path / strategy), strategy=strategy, **common)
        run.train(cfg)
        finals[strategy] = _final(tmp_path / strategy, cfg)
    real, calls = run.train_step, {"n": 0}

    def crash_at_4(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(run, "train_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run.train(cfg_for(out=str(tmp_path / "both"), strategy="ddp", **common))
    monkeypatch.setattr(run, "train_step", real)
    run.train(cfg_for(out=str(tmp_path / "both"), strategy="fsdp", **common))
    finals["both"] = _final(tmp_path / "both", cfg_for(**common))
    a = finals["ddp"]
    for other in ("fsdp", "both"):
        b = finals[other]
        assert a["step"] == b["step"] == 6
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)


@DALI
def test_dali_loader_shards_resumes_and_erases(folder):
    """Labels set to file numbers: each rank's epoch is whole batches of distinct files, the ranks' disjoint; a
    start mid-epoch gives the uninterrupted epoch's later batches; the next epoch another order; random erasing
    (reprob 1) changes pixels, reproducibly."""
    from conmim.finetune.data import DaliLabelledLoader

    files = sorted(str(f) for f in (folder / "train").rglob("*.png"))
    cfg = cfg_for(reprob=0.0)

    def make(rank, world=2, c=cfg):
        return DaliLabelledLoader(files, list(range(len(files))), c, 16, 4, rank, world, 0, None, 1)

    epochs = [[(x, y) for x, y in make(r)] for r in (0, 1)]
    seen = [torch.cat([y for _, y in e]).tolist() for e in epochs]
    assert [len(s) for s in seen] == [12, 12] and len(set(seen[0]) | set(seen[1])) == 24
    assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 for e in epochs for x, _ in e)
    again = make(0)
    again.set_epoch(0, start=8)
    assert len(again) == 4
    later = list(again)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(later, epochs[0][2:]))
    assert len(later) == 1
    again.set_epoch(1)
    assert torch.cat([y for _, y in again]).tolist() != seen[0]
    erased = [make(0, c=cfg_for(reprob=1.0)) for _ in range(2)]
    a, b = (next(iter(e))[0] for e in erased)
    assert torch.equal(a, b) and not torch.equal(a, epochs[0][0][0])


def test_dali_rand_augment_arguments_from_timm_policies():
    from conmim.finetune.data import rand_augment_args

    assert rand_augment_args("rand-m9-mstd0.5-inc1") == {"n": 2, "m": 9, "num_magnitude_bins": 11}
    assert rand_augment_args("rand-n3-m5") == {"n": 3, "m": 5, "num_magnitude_bins": 11}
    with pytest.raises(ValueError, match="RandAugment policies"):
        rand_augment_args("original-mstd0.5")
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment_args("rand-m12")


def test_validation_shares_are_padded_to_equal_length_and_padding_is_not_counted(tmp_path):
    from conmim.finetune.data import PAD_LABEL, eval_loader

    files, labels = [f"f{i}" for i in range(7)], [i % 3 for i in range(7)]
    shares = [eval_loader(files, labels, None, 2, r, 3, 0, False).dataset for r in range(3)]
    assert [len(d) for d in shares] == [3, 3, 3]
    real = sorted(f for d in shares for f, y in zip(d.files, d.labels) if y != PAD_LABEL)
    assert real == sorted(files)  # every image once
    assert sum(y == PAD_LABEL for d in shares for y in d.labels) == 2


def test_fp16_skips_a_step_with_non_finite_gradients_and_lowers_the_scale(folder, tmp_path):
    cfg = cfg_for(data=str(folder), out=str(tmp_path / "x"), precision="fp16", mixup=0.0, cutmix=0.0,
                  accum_steps=1, drop_path=0.0)  # fmt: skip
    r = run.build_run(cfg, 0, 1, torch.device("cpu"))
    assert r.scaler.is_enabled() and r.autocast.fast_dtype == torch.float16
    state, sums = run.RunState(), torch.zeros(2)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in r.net.state_dict().items()}
    scale = r.scaler.get_scale()
    run.train_step(r, state, [(x.clone().fill_(float("inf")), y)], sums)
    assert all(torch.equal(before[k], v) for k, v in r.net.state_dict().items())  # skipped
    assert r.scaler.get_scale() == scale / 2
    run.train_step(r, state, [(x, y)], sums)
    assert any(not torch.equal(before[k], v) for k, v in r.net.state_dict().items())  # a finite step trains
    assert state.step == 2


def test_bad_input_writes_nothing(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    base = [
        "--init",
        "none",
        "--model",
        "vit_tiny_demo",
        "--num_workers",
        "0",
        "--data",
        str(folder),
        "--out",
        str(out),
    ]
    assert run.main([*base, "--batch_size", "3"]) == 2
    assert "batch_size must be even" in capsys.readouterr().err
    assert run.main([*base, "--batch_size", "64"]) == 2  # 24 images: no full step
    assert "no optimizer step" in capsys.readouterr().err
    assert run.main(["--init", str(tmp_path / "nope"), "--data", str(folder), "--out", str(out)]) == 2
    assert run.main([*base[:-2]]) == 2
    assert "out is required" in capsys.readouterr().err
    assert run.main([*base, "--loader", "dali", "--auto_augment", "original"]) == 2
    assert "RandAugment policies" in capsys.readouterr().err
    with monkeypatch.context() as m:
        import conmim.data.dali_loader as dali

        m.setattr(dali, "dali_status", lambda: "NVIDIA DALI is not available (test)")
        assert run.main([*base, "--loader", "dali"]) == 2
        assert "loader dali: NVIDIA DALI is not available" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_kill_minus_9_then_resume_matches(folder, tmp_path):
    """A real SIGKILL mid-run (subprocess), then the same command again: final weights bit-identical to an
    uninterrupted run's."""
    args = ["--init", "none", "--model", "vit_tiny_demo", "--image_size", "16", "--data", str(folder),
            "--epochs", "4", "--batch_size", "4", "--num_workers", "0", "--precision", "fp32", "--progress",
            "false", "--checkpoint_every", "1", "--keep_last", "3", "--config", "official", "--lr_batch", "4", "--warmup_epochs", "1"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "conmim.finetune"]
    subprocess.run([*cmd, *args, "--out", str(tmp_path / "whole")], env=env, check=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, *args, "--out", str(cut)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cut.glob("ckpt-*[0-9]"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / run.RESULTS).exists(), "the run finished before it was killed"
    subprocess.run([*cmd, *args, "--out", str(cut)], env=env, check=True)
    cfg = cfg_for(image_size=16)
    a, b = _final(tmp_path / "whole", cfg), _final(cut, cfg)
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_under_torchrun(folder, tmp_path, strategy):
    """DDP and FSDP on gloo: 2 ranks with gradient accumulation run to the end; each epoch has the steps of the
    global batch, and the ranks' validation shares add up to every image once."""
    out = tmp_path / strategy
    args = ["--init", "none", "--model", "vit_tiny_demo", "--image_size", "16", "--data", str(folder),
            "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "2", "--accum_steps", "2", "--num_workers",
            "0", "--precision", "fp32", "--progress", "false", "--out", str(out), "--strategy", strategy,
            "--eval_batch_size", "5"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, "-m", "conmim.finetune", *args], env=env, check=True, timeout=300)
    res = json.loads((out / run.RESULTS).read_text())
    assert res["epochs"] == 2 and 0 <= res["top1"] <= res["top5"] <= 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # 24 images / (2 per micro-batch x 2 micro-batches x 2 ranks) = 3 steps per epoch
    assert max(r["step"] for r in rows) == 6
    top1 = [r["top1"] for r in rows if "top1" in r]
    assert all(abs(t * 12 - round(t * 12)) < 1e-9 for t in top1)  # counts over all 12 validation images


def test_demo_benchmark_commands_are_valid_configs():
    from benchmarks.finetune_demo import finetune_command

    for init in ("runs/tiny_demo", "none"):
        cmd = finetune_command(init, 1, Path("out"))
        assert cmd[0] == "conmim-finetune"
        args = vars(run.parser().parse_args(cmd[1:]))
        cfg = cfgmod.resolve(FinetuneConfig, args.pop("config"), args)
        assert cfg.seed == 1 and cfg.train_fraction == 0.1 and cfg.data == "samples:mnist"
        if init == "none":
            assert recipe.resolve_init(cfg).kwargs["img_size"] == 32
