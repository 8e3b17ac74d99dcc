"""Data pipeline: images/s of the full two-view + mask pipeline, DALI (cpu here, mixed on a GPU) vs the
torch/torchvision fallback, on the same cores and the same images (the bundled sample photos, copied to fill
a folder), 224 px views, block masks."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import table
from conmim.data import ViewConfig, build_loader, dali_status, samples

IMAGES = {"quick": 224, "full": 1024}


def _folder(n: int) -> Path:
    base = Path(tempfile.gettempdir()) / "conmim-bench-data"
    src = samples.build(base / "samples", mnist=False)["photos"]
    root = base / f"photos-{n}"
    if not root.is_dir() or len(list(root.iterdir())) != n:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        photos = sorted(src.iterdir())
        for i in range(n):
            p = photos[i % len(photos)]
            shutil.copyfile(p, root / f"{i:05d}{p.suffix}")
    return root


def run(suite: str, device: torch.device, ceil: dict, rounds: int) -> list[dict]:
    n = IMAGES[suite]
    root = _folder(n)
    workers = max(1, torch.get_num_threads())
    loaders = ["torch"] + (["dali"] if dali_status() is None else [])
    records = []
    for kind in loaders:
        loader = build_loader(
            root, 32, ViewConfig(), loader=kind, device=device, num_workers=workers, seed=0, verbose=False
        )
        rates = []
        for epoch in range(1 + max(1, rounds // 3)):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            seen = 0
            for s, _, _ in loader:
                seen += s.shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch > 0:  # epoch 0 warms up workers and pipelines
                rates.append(seen / (time.perf_counter() - t0))
        decode = ("mixed" if device.type == "cuda" else "cpu") if kind == "dali" else "PIL"
        records.append(
            {
                "op": "data",
                "loader": kind,
                "decode": decode,
                "images": n,
                "workers": workers,
                "image_size": 224,
                "images_per_s": sorted(rates)[len(rates) // 2],
                "epochs": len(rates),
            }
        )
    base = next((r["images_per_s"] for r in records if r["loader"] == "torch"), None)
    for r in records:
        r["speedup_vs_torch"] = r["images_per_s"] / base if base else None
    return records


def render(records: list[dict]) -> str:
    rows = [
        [
            r["loader"],
            r["decode"],
            str(r["workers"]),
            f"{r['images_per_s']:.0f}",
            f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-",
        ]
        for r in records
    ]
    return table(rows, ["loader", "decode", "workers/threads", "images/s", "vs torch"])
