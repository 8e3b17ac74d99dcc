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
