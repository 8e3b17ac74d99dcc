"""Data pipeline: images/s of the full two-view + mask pipeline per source (image folder, file list, tar shards)
and loader (DALI: ``cpu`` decode here, ``mixed`` on a GPU; the torch/torchvision fallback), on the same cores and
the same images (the bundled sample photos, copied to fill a folder), 224 px views, block masks; and the folder
scan on a synthetic tree of many small files (cold: no index; warm: ``content`` and ``stat`` index modes).

``run``/``render`` serve ``python -m benchmarks --ops data``; ``python -m benchmarks.bench_data`` runs the
sources and the scan measurement and writes ``benchmarks/results/data-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import commit, device_name, table, versions
from conmim.data import ViewConfig, build_loader, dali_status, samples, scan, scan_folder
from conmim.shards import write_shards

IMAGES = {"quick": 224, "full": 1024}
SOURCES = ("folder", "list", "shards")


def _base() -> Path:
    return Path(tempfile.gettempdir()) / "conmim-bench-data"


def _folder(n: int) -> Path:
    base = _base()
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


def _source(kind: str, n: int) -> str:
    """The same n images as a folder, a file list, or shards (about 8 per source, written once)."""
    root = _folder(n)
    if kind == "folder":
        return str(root)
    if kind == "list":
        lst = _base() / f"photos-{n}.txt"
        if not lst.exists():
            lst.write_text("".join(f"{p}\n" for p in sorted(root.iterdir())))
        return str(lst)
    out = _base() / f"shards-{n}"
    if not (out / "index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        total = sum(p.stat().st_size for p in root.iterdir())
        write_shards(root, out, shard_bytes=total // 8 + 1, verbose=False)
    return json.loads((out / "index.json").read_text())["pattern"]


def run(suite: str, device: torch.device, ceil: dict, rounds: int, sources=SOURCES) -> list[dict]:
    n = IMAGES[suite]
    workers = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    loaders = ["torch"] + (["dali"] if dali_status() is None else [])
    records = []
    for source in sources:
        spec = _source(source, n)
        for kind in loaders:
            loader = build_loader(
                spec, 32, ViewConfig(), loader=kind, device=device, num_workers=workers, seed=0, verbose=False
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
                    "source": source,
                    "loader": kind,
                    "decode": decode,
                    "images": n,
                    "workers": workers,
                    "image_size": 224,
                    "images_per_s": sorted(rates)[len(rates) // 2],
                    "epochs": len(rates),
                }
            )
    for r in records:
        base = next(
            (x["images_per_s"] for x in records if x["loader"] == "torch" and x["source"] == r["source"]),
            None,
        )
        r["speedup_vs_torch"] = r["images_per_s"] / base if base else None
    return records


def render(records: list[dict]) -> str:
    rows = [
        [
            r.get("source", "folder"),
            r["loader"],
            r["decode"],
            str(r["workers"]),
            f"{r['images_per_s']:.0f}",
            f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-",
        ]
        for r in records
    ]
    return table(rows, ["source", "loader", "decode", "workers/threads", "images/s", "vs torch"])


# ---------------------------------------------------------------------------------------------------- the scan
def _small_tree(root: Path, n: int, per_folder: int = 1000) -> float:
    """n small images (24 x 24 to 64 x 64 PNG and JPEG, 1000 distinct ones repeated) in folders of
    ``per_folder``; returns the seconds it took."""
    import io

    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(1000):
        h, w = (int(x) for x in rng.integers(24, 65, 2))
        buf = io.BytesIO()
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(buf, format="PNG" if i % 2 else "JPEG", quality=90)
        blobs.append((".png" if i % 2 else ".jpg", buf.getvalue()))
    for i in range(n):
        d = root / f"c{i // per_folder:04d}"
        if i % per_folder == 0:
            d.mkdir(parents=True, exist_ok=True)
        ext, data = blobs[i % len(blobs)]
        with open(d / f"{i:07d}{ext}", "wb") as fh:
            fh.write(data)
    return time.perf_counter() - t0


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _imagenet_like_cost(n: int = 64) -> dict:
    """Seconds per check of a 500 x 375 JPEG (ImageNet's typical size; the mean bytes are recorded), and the digest's
    bytes/s: the two per-file costs a scan of ImageNet-1K pays."""
    import io

    from PIL import Image

    src = sorted(_folder(8).iterdir())
    blobs = []
    for i in range(n):
        with Image.open(src[i % len(src)]) as im:
            im = im.convert("RGB").resize((500, 375))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90 - i % 7)
            blobs.append(buf.getvalue())
    t_check, _ = _timed(lambda: [scan.check_bytes(b) for b in blobs])
    big = b"".join(blobs) * 8
    t_hash, _ = _timed(lambda: scan.digest(big))
    return {
        "jpeg_bytes_mean": sum(map(len, blobs)) / n,
        "check_s_per_file": t_check / n,
        "digest_bytes_per_s": len(big) / t_hash,
    }


def measure_scan(n: int, keep: bool = False) -> dict:
    """The folder scan of n small files: cold (no index) on one process and on every core, warm in the
    ``content`` and ``stat`` modes, and the bare walk (``scan="off"``); files/s for each."""
    base = Path(tempfile.mkdtemp(prefix="conmim-scan-", dir=_base() if _base().is_dir() else None))
    root, idx = base / "tree", base / "index"
    try:
        gen_s = _small_tree(root, n)
        rec = {"files": n, "generate_s": gen_s, "cores": scan.workers()}
        real_workers = scan.workers
        cases = [("cold_1_process", 1, "content"), (f"cold_{real_workers()}_processes", None, "content")]
        for name, procs, mode in cases:
            shutil.rmtree(idx, ignore_errors=True)
            scan.workers = (lambda: 1) if procs == 1 else real_workers
            try:
                t, found = _timed(
                    lambda mode=mode: scan_folder(root, index_dir=idx, verbose=False, scan=mode)
                )
            finally:
                scan.workers = real_workers
            assert len(found) == n, (len(found), n)
            rec[name] = {"s": t, "files_per_s": n / t}
        for mode in ("content", "stat", "off"):
            t, found = _timed(lambda mode=mode: scan_folder(root, index_dir=idx, verbose=False, scan=mode))
            assert len(found) == n
            rec[f"warm_{mode}"] = {"s": t, "files_per_s": n / t}
        return rec
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def extrapolate(scan_rec: dict, cost: dict, files: int = 1_281_167, bytes_total: float = 140e9) -> dict:
    """ImageNet-1K's train split (1,281,167 JPEGs, about 140 GB) from the measurements, files in page cache or
    on storage faster than the digest. Serial: the walk, the stats and the index (the small tree's warm "stat"
    scan per file). Parallel over the cores: the check, scaled from the 500 x 375 JPEGs by file size (entropy
    decoding, which a reduced-scale JPEG decode still does in full, grows with the bytes), and the digest."""
    serial = files / scan_rec["warm_stat"]["files_per_s"]
    avg = bytes_total / files
    check = cost["check_s_per_file"] * avg / cost["jpeg_bytes_mean"]
    digest = avg / cost["digest_bytes_per_s"]
    out = {"files": files, "bytes": bytes_total, "check_s_per_file": check, "digest_s_per_file": digest}
    for cores in (1, scan_rec["cores"], 16):
        out[f"cold_s_{cores}_cores"] = serial + files * (check + digest) / cores
        out[f"warm_content_s_{cores}_cores"] = serial + files * digest / cores
    out["warm_stat_s"] = serial
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--suite", choices=tuple(IMAGES), default="quick")
    p.add_argument("--rounds", type=int, default=6, help="timed epochs are rounds // 3 (at least 1)")
    p.add_argument(
        "--scan-files", type=int, default=100_000, help="files in the synthetic scan tree (0: skip)"
    )
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/data-<device>.json)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    load_before = os.getloadavg()[0]
    out = {
        "label": "CPU" if device.type == "cpu" else "GPU",
        "device": device_name(device),
        "cores": scan.workers(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "versions": versions(),
        "load": "a machine shared with other jobs: the numbers are lower bounds and vary run to run; "
        "the 1-minute load average before and after is recorded",
    }
    print(f"device: {out['device']}", flush=True)
    out["sources"] = run(a.suite, device, {}, a.rounds)
    print(render(out["sources"]), flush=True)
    if a.scan_files:
        out["scan"] = measure_scan(a.scan_files)
        out["imagenet_like_check"] = _imagenet_like_cost()
        out["imagenet_1k_extrapolated"] = extrapolate(out["scan"], out["imagenet_like_check"])
        print(
            json.dumps(
                {k: out[k] for k in ("scan", "imagenet_like_check", "imagenet_1k_extrapolated")}, indent=1
            )
        )
    out["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
    path = Path(a.out or Path(__file__).parent / "results" / f"data-{device.type}-{out['cores']}core.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
