"""``conmim-shards SRC DEST``: write an image folder or a file list as tar shards (WebDataset layout) for
``--data`` (:func:`write_shards`; docs/data.md). Reading them is :mod:`conmim.data.shards`."""

from __future__ import annotations

import argparse
import bisect
import io
import itertools
import json
import math
import os
import random
import re
import sys
import tarfile
from pathlib import Path

from conmim._fs import write_atomic
from conmim.data import scan as scanmod
from conmim.data.scan import printable
from conmim.data.sources import resolve_data, scan_source


# ------------------------------------------------------------------------------------------------------ writing
def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"a size such as 256MB or 1GB, got {text!r}")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i")
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    value = int(float(m.group(1)) * mult)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive size, got {text!r}")
    return value


def write_shards(
    src,
    dest,
    shard_bytes: int = 256 * 2**20,
    seed: int = 0,
    prefix: str = "shard",
    scan: str = "content",
    verbose: bool = True,
) -> dict:
    """Write the usable images of ``src`` (a folder or a file list) as tar shards in ``dest``.

    The images are shuffled once with ``seed``, then cut into ``ceil(total bytes / shard_bytes)`` shards of
    nearly equal size (each cut at the file boundary nearest to an equal share, so shard sizes differ by at most
    the largest file), keeping the shuffled order.
    Sample keys are the shuffled position (``00000042``); each sample holds the image (its extension, lower
    case) and, when the source has classes, a ``cls`` component with the label. Beside the shards: a DALI index
    per shard (``SHARD.idx``), ``samples.tsv`` (key, shard, source path, label), and ``index.json`` (shards,
    sample counts, bytes, seed, classes, the brace pattern to pass as ``--data``). Shards are written under
    temporary names and renamed, ``index.json`` last: a folder with an ``index.json`` is complete.

    Raises:
        FileExistsError: ``dest`` already holds an ``index.json`` or shards (nothing is overwritten).
        ValueError: bad ``shard_bytes``/``prefix``, or ``src`` holds no usable image.
    """
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_', '.', '-', got {prefix!r}")
    source = resolve_data(src)
    if source.kind == "shards":
        raise ValueError(f"src {src!r} is already shards; give an image folder or a file list")
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and (
        not dest.is_dir() or (dest / "index.json").exists() or any(dest.glob(f"{prefix}-*.tar"))
    ):
        raise FileExistsError(
            f"dest {printable(dest)!r} already holds shards or is not a folder; choose another"
        )
    found = scan_source(source, verbose=verbose, scan=scan)
    order = list(range(len(found.files)))
    random.Random(seed).shuffle(order)
    sizes = [os.stat(found.files[i]).st_size for i in order]
    total = sum(sizes)
    count = max(1, min(len(order), math.ceil(total / shard_bytes)))
    cum = list(itertools.accumulate(sizes))
    cuts = []
    for k in range(
        1, count
    ):  # each cut at the file boundary nearest to an equal share: sizes within one file
        target = total * k / count
        j = bisect.bisect_left(cum, target)  # cum[j] >= target: cutting after file j or before it
        before = cum[j - 1] if j > 0 else 0
        cuts.append(j + 1 if cum[j] - target < target - before else j)
    bounds = sorted({0, *cuts, len(order)})
    dest.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(bounds) - 2)))
    kw = max(8, len(str(len(order) - 1)))
    labelled = bool(found.classes)
    shards, rows = [], []
    from tqdm import tqdm

    bar = tqdm(
        total=len(order), desc="writing shards", unit="file", delay=2.0, disable=not verbose, file=sys.stderr
    )
    with bar:
        for n in range(len(bounds) - 1):
            name = f"{prefix}-{n:0{width}d}.tar"
            tmp = dest / f".{name}.tmp"
            idx_lines, nbytes = [], 0
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for pos in range(bounds[n], bounds[n + 1]):
                    i = order[pos]
                    path = found.files[i]
                    key = f"{pos:0{kw}d}"
                    ext = os.path.splitext(path)[1].lstrip(".").lower()
                    with open(path, "rb") as fh:
                        data = fh.read()
                    parts = [(f"{key}.{ext}", data)]
                    if labelled:
                        parts.append((f"{key}.cls", str(found.labels[i]).encode()))
                    line = []
                    for member, payload in parts:
                        info = tarfile.TarInfo(member)
                        info.size, info.mtime, info.mode = len(payload), 0, 0o644
                        tar.addfile(info, io.BytesIO(payload))
                        line.append(
                            f"{member.split('.', 1)[1]} {tar.offset - _padded(len(payload))} {len(payload)} {member}"
                        )
                    idx_lines.append(" ".join(line) + "\n")
                    nbytes += len(data)
                    rows.append(f"{key}\t{name}\t{printable(path)}\t{found.labels[i]}\n")
                    bar.update(1)
            os.replace(tmp, dest / name)
            write_atomic(
                dest / f"{prefix}-{n:0{width}d}.idx", f"v1.2 {len(idx_lines)}\n" + "".join(idx_lines)
            )
            shards.append({"name": name, "samples": bounds[n + 1] - bounds[n], "bytes": nbytes})
    write_atomic(dest / "samples.tsv", "key\tshard\tsource\tlabel\n" + "".join(rows))
    last = len(shards) - 1
    pattern = (
        str(dest / f"{prefix}-{{{0:0{width}d}..{last:0{width}d}}}.tar")
        if last
        else str(dest / shards[0]["name"])
    )
    index = {
        "version": 1,
        "source": printable(found.root),
        "seed": seed,
        "shard_bytes": shard_bytes,
        "samples": len(order),
        "bytes": total,
        "classes": found.classes,
        "excluded": len(found.bad),
        "pattern": pattern,
        "shards": shards,
    }
    write_atomic(dest / "index.json", json.dumps(index, indent=1) + "\n")
    return index


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="conmim-shards",
        description="Write an image folder or file list as tar shards (WebDataset layout) for --data.",
    )
    p.add_argument("src", help="image folder or file list (text file, one path per line)")
    p.add_argument("dest", help="output folder (new or empty)")
    p.add_argument("--shard-size", type=_size, default="256MB", help="target bytes per shard (default 256MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the samples (default 0)")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar (default shard)")
    p.add_argument("--scan", choices=scanmod.SCANS, default="content", help="how the source is checked")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no excluded-file lines")
    a = p.parse_args(argv)
    try:
        index = write_shards(a.src, a.dest, a.shard_size, a.seed, a.prefix, a.scan, verbose=not a.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"conmim-shards: error: {printable(exc)}", file=sys.stderr)
        return 2
    n, b = index["samples"], index["bytes"]
    print(f"{n} images, {b / 2**20:.1f} MiB in {len(index['shards'])} shard(s); --data {index['pattern']}")
    if index["excluded"]:
        print(f"{index['excluded']} file(s) excluded (unreadable or not images); see the lines above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
