"""The online k-NN monitor and conmim-eval's report (baseline beside the result, where the JSON went)."""

import json

import pytest
import torch

import conmim
from conmim import evaluate as E
from conmim import train as T
from conmim.models import build_encoder
from tests.conftest import tiny


def _encoder(seed=0):
    torch.manual_seed(seed)
    return build_encoder("vit_tiny_demo", 64, 16, img_size=32, patch_size=4)


def _expected(backbone, labelled_digits) -> float:
    """k-NN top-1 computed the long way: every file, the backbone in eval mode."""
    tr, va = E.labelled_split(labelled_digits)
    backbone.eval()
    ftr, fva = E.features(backbone, tr.files, 32), E.features(backbone, va.files, 32)
    backbone.train()
    return E.knn_top1(ftr, torch.tensor(tr.labels), fva, torch.tensor(va.labels))


@pytest.mark.parametrize("wrapper", ["encoder", "teacher", "backbone"])
def test_monitor_matches_the_full_knn(labelled_digits, wrapper):
    enc = _encoder()
    model = {"encoder": enc, "teacher": conmim.MomentumTeacher(enc), "backbone": enc.backbone}[wrapper]
    got = E.knn_monitor(model, str(labelled_digits), max_train=None, max_val=None)
    assert got == pytest.approx(_expected(enc.backbone, labelled_digits), abs=0)
    assert 0.0 <= got <= 1.0


@pytest.mark.parametrize("training", [True, False])
def test_monitor_restores_the_mode_and_needs_no_grad(labelled_digits, training):
    enc = _encoder()
    enc.train(training)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    E.knn_monitor(enc, str(labelled_digits))
    assert enc.backbone.training == training and enc.training == training
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items()), "the monitor changed weights"
    assert all(p.grad is None for p in enc.parameters())


def test_monitor_uses_an_even_subset(labelled_digits):
    xtr, ytr, xva, yva = E._monitor_set(str(labelled_digits), 32, 6, 4)
    assert xtr.shape == (6, 3, 32, 32) and xtr.dtype == torch.uint8 and xva.shape[0] == yva.shape[0] == 4
    tr, _ = E.labelled_split(labelled_digits)
    assert ytr.tolist() == [tr.labels[i] for i in E._evenly(len(tr), 6)]


@pytest.mark.parametrize(
    ("n", "limit", "expected"),
    [(10, None, list(range(10))), (10, 10, list(range(10))), (10, 25, list(range(10))), (10, 3, [0, 3, 6]),
     (0, 5, []), (7, 1, [0])],
)  # fmt: skip
def test_evenly(n, limit, expected):
    assert E._evenly(n, limit) == expected


def test_evenly_keeps_every_class_share():
    labels = [c for c in range(10) for _ in range(40)]  # sorted by class, as a scan returns them
    picked = [labels[i] for i in E._evenly(len(labels), 50)]
    assert all(picked.count(c) == 5 for c in range(10))


def test_eval_states_the_baseline_and_the_json(digits, labelled_digits, tmp_path, capsys):
    run = tmp_path / "run"
    T.train(tiny(digits, run, epochs=1))
    assert E.main(["knn", str(run), "--data", str(labelled_digits)]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads((run / "eval_knn_teacher.json").read_text())
    assert out[0] == (
        f"k-NN top-1 of the teacher: {100 * result['top1']:.2f}% (random initialisation: "
        f"{100 * result['top1_random_init']:.2f}%, {100 * (result['top1'] - result['top1_random_init']):+.2f} points)"
    )
    assert out[1] == f"results written to {run / 'eval_knn_teacher.json'}"
    assert (
        E.main(
            [
                "knn",
                str(run),
                "--data",
                str(labelled_digits),
                "--no-compare-random",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert "random" not in capsys.readouterr().out
    assert "top1_random_init" not in json.loads((tmp_path / "r.json").read_text())
