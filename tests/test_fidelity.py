"""benchmarks/fidelity.py's parts that need no training: the commands it runs and what it reads back."""

import json

import pytest

from benchmarks import fidelity as F


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [
        (None, ["conmim-train", "--config", "tiny_demo", "--seed", "1", "--out", "o"]),
        (20, ["conmim-train", "--config", "tiny_demo", "--epochs", "20", "--seed", "1", "--out", "o"]),
    ],
)
def test_train_command_is_the_readme_command(epochs, expected):
    assert F.train_command(epochs, 1, "o") == expected


def test_monitored_reads_the_runs_own_baseline_and_last_knn(tmp_path):
    rows = [
        {"epoch": 0, "step": 0, "knn_top1_random_init": 0.32},
        {"step": 5, "epoch": 0, "loss": 4.0},
        {"epoch": 1, "step": 60, "knn_top1": 0.34},
        {"epoch": 2, "step": 120, "knn_top1": 0.38},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert F.monitored(tmp_path) == {
        "monitor_knn_random_init": 0.32,
        "monitor_knn_teacher": 0.38,
        "steps": 120,
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    assert F.monitored(tmp_path) == {}
