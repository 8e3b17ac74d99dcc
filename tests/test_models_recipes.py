"""The paper's recipes as presets: every value equal to the official one, the docs table generated from them,
the global-batch note, and a short conmim-train run of each preset's network."""

from pathlib import Path

import pytest
import yaml

from conmim import config as cfgmod
from conmim import recipes as R

ROOT = Path(__file__).resolve().parents[1]


def test_committed_table_matches_the_presets():
    assert (ROOT / "docs" / "recipes.md").read_text() == R.markdown(), (
        "run: python -m conmim.recipes --write docs/recipes.md"
    )


@pytest.mark.parametrize("preset", sorted(R.PRESETS))
def test_presets_equal_the_official_values_and_use_existing_keys(preset):
    keys = set(yaml.safe_load((ROOT / "conmim" / "configs" / f"{preset}.yaml").read_text()))
    fields = {f.name for f in cfgmod.dataclasses.fields(cfgmod.TrainConfig)}
    assert keys <= fields
    assert keys == set(R.official(preset))  # every official value is stated, nothing else
    assert R.differences(preset) == []


def test_a_wrong_value_shows_in_the_table():
    off = R.official("conmim_vit_l")
    assert not off["lr"].matches(5e-4) and off["lr"].matches(7.5e-4)
    assert not off["mask"].matches("block") and not off["clip_grad"].matches(0.0)
    s = R.official("conmim_vit_s")
    assert s["mask_ratio"].matches(0.3827) and not s["mask_ratio"].matches(0.4)
    assert not s["warmup_epochs"].matches(10.0) and not s["precision"].matches("bf16")
    with pytest.raises(ValueError, match="preset must be one of"):
        R.official("vit_s")


def test_batch_note():
    assert R.batch_note("beit_base_conmim", 2048, 5e-4) is None
    assert R.batch_note("vit_tiny_demo", 32, 2e-3) is None  # no paper recipe to compare with
    note = R.batch_note("beit_large_conmim", 512, 7.5e-4)
    assert "512" in note and "2048" in note and "kept as given" in note and "0.000188" in note
    assert "rule: keep" in R.batch_line("beit_base_conmim", 256, 5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(R.PRESETS))
def test_twenty_steps_of_each_presets_network(preset, digits, tmp_path):
    """The preset's network, masking and optimiser settings at a CPU size: 32 px images of 8 px patches (a 4 x 4
    grid), one image a step, so that the 20 steps end inside the first epoch (one checkpoint, at the end)."""
    from conmim import train as T
    from conmim.checkpoint import read_latest

    over = dict(data=str(digits), out=str(tmp_path / "run"), image_size=32, patch_size=8, batch_size=1)
    over.update(head_hidden=64, head_out=32, max_steps=20, precision="fp32", num_workers=0, loader="torch")
    over.update(progress=False, log_every=5, eval_every=0, warmup_epochs=0.1)
    cfg = cfgmod.resolve(cfgmod.TrainConfig, preset, over)
    T.train(cfg)
    state = read_latest(tmp_path / "run")
    assert state["step"] == 20
    assert "backbone.rel_pos_bias.relative_position_bias_table" in state["teacher"]
