"""Tar shards in the WebDataset layout: scanning them, reading their samples, and writing them from a folder.

A shard is a plain tar; a sample is the run of consecutive members sharing a key (the member name up to the first
dot of its base name), each member one component named by the rest (``n01440764_10026.jpg``,
``n01440764_10026.cls``). The image of a sample is its first component with an image extension; a ``cls``
component, when every sample has one, gives integer labels.

The scan indexes every shard once (offset and size of each image, read with the standard ``tarfile`` module) and
checks every image as a folder scan does, with the same index modes (``content``, ``stat``, ``off``) and cache.
A bad sample is excluded and reported as ``SHARD:KEY``: DALI's ``fn.readers.webdataset`` then reads through an
index file that lists only the good samples (DALI's own v1.2 format), so it never meets one, and the torch
loader reads each good sample at its offset.

Samples are numbered across the shards in the order the shards are given; ranks split that numbering exactly as
they split a folder's files (every sample once per epoch, at sample granularity, so the number of shards need
not divide by the number of ranks or workers).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from conmim._fs import exclusive
from conmim.data import scan as scanmod
from conmim.data.scan import printable

IMAGE_EXTS = tuple(e.lstrip(".") for e in scanmod.EXTENSIONS)
DALI_EXT = "img"  # the one component name the index files given to DALI use, whatever the member's extension


@dataclass
class ShardSet:
    """Scanned shards: ``samples[i] = (shard number, key, offset, size)`` of each usable image, integer labels
    (-1 without ``cls`` components), and the excluded samples as (``SHARD:KEY``, reason)."""

    root: Path
    shards: list[str]
    samples: list[tuple[int, str, int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def files(self) -> list[str]:
        """``SHARD:KEY`` of every usable sample (for reports; the bytes are read with :class:`TarReader`)."""
        return [f"{self.shards[s]}:{k}" for s, k, _, _ in self.samples]

    def reader(self) -> TarReader:
        return TarReader(self.shards, [(s, o, n) for s, _, o, n in self.samples])

    def write_dali_indexes(self, folder) -> tuple[list[str], list[str]]:
        """(shards, index files) for ``fn.readers.webdataset``: one v1.2 index per shard holding a usable sample,
        listing only those, each named by its sample number (which ``source_info`` then reports)."""
        folder = Path(folder)
        rows: dict[int, list[str]] = {}
        for i, (s, _, off, size) in enumerate(self.samples):
            rows.setdefault(s, []).append(f"{DALI_EXT} {off} {size} {i}.{DALI_EXT}\n")
        paths, indexes = [], []
        for s in sorted(rows):
            idx = folder / f"{s:06d}.idx"
            idx.write_text(f"v1.2 {len(rows[s])}\n" + "".join(rows[s]))
            paths.append(self.shards[s])
            indexes.append(str(idx))
        return paths, indexes


class TarReader:
    """Picklable random access to samples inside tar files: ``read(i)`` returns sample i's bytes. Each process
    (DataLoader worker) opens the shards it needs once."""

    def __init__(self, shards: list[str], where: list[tuple[int, int, int]]):
        self.shards, self.where = shards, where
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.where)

    def __getstate__(self):
        return {"shards": self.shards, "where": self.where, "_open": {}}

    def read(self, i: int) -> bytes:
        s, off, size = self.where[i]
        fh = self._open.get(s)
        if fh is None:
            fh = self._open[s] = open(self.shards[s], "rb")  # noqa: SIM115 (kept open for the worker's life)
        fh.seek(off)
        data = fh.read(size)
        if len(data) != size:
            raise OSError(
                f"{printable(self.shards[s])}: {size} bytes expected at offset {off}, got {len(data)}"
            )
        return data

    def name(self, i: int) -> str:
        s, off, _ = self.where[i]
        return f"{self.shards[s]}@{off}"


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = the name up to the first dot of its base name, extension = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _members(fileobj) -> tuple[list[tuple[str, list[tuple[str, int, int]]]], str | None]:
    """(samples, problem): each sample as (key, [(ext, offset, size), ...]) in tar order; problem is why the tar
    could not be read to its end (None when it could)."""
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    problem = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                if not ext or os.path.basename(key).startswith("."):
                    continue
                if samples and samples[-1][0] == key:
                    samples[-1][1].append((ext, m.offset_data, m.size))
                else:
                    samples.append((key, [(ext, m.offset_data, m.size)]))
    except (tarfile.TarError, OSError, EOFError) as exc:
        problem = f"tar damaged after {len(samples)} sample(s): {printable(exc)}"
    return samples, problem


def _scan_shard(path: str, known: dict | None, mode: str) -> dict:
    """One shard's index entry: {"key", "sha", "samples": [[key, offset, size, label, bad], ...], "problem"}."""
    try:
        key = scanmod._stat_key(os.stat(path))
    except OSError as exc:
        return {"key": None, "sha": None, "samples": [], "problem": f"unreadable: {exc.strerror or exc}"}
    if mode == "stat" and known is not None and known.get("key") == key:
        return known
    if mode == "off":
        with open(path, "rb") as fh:
            found, problem = _members(fh)
        data, sha = None, None
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return {"key": key, "sha": None, "samples": [], "problem": f"unreadable: {exc.strerror or exc}"}
        sha = scanmod.digest(data)
        if known is not None and known.get("sha") == sha:
            return dict(known, key=key)
        found, problem = _members(io.BytesIO(data))
    rows = []
    for k, parts in found:
        image = next(((e, o, n) for e, o, n in parts if e.lower() in IMAGE_EXTS), None)
        cls = next(((o, n) for e, o, n in parts if e.lower() == "cls"), None)
        label = None
        if cls is not None and data is not None:
            text = data[cls[0] : cls[0] + cls[1]].decode("ascii", "replace").strip()
            label = int(text) if re.fullmatch(r"-?\d+", text) else None
        if image is None:
            names = ", ".join(e for e, _, _ in parts)
            rows.append([k, 0, 0, label, f"no image component (has: {names})"])
            continue
        _, off, size = image
        bad = None if data is None else scanmod.check_bytes(data[off : off + size])
        if data is not None and off + size > len(data):
            bad = "truncated: the sample runs past the end of the shard"
        rows.append([k, off, size, label, bad])
    return {"key": key, "sha": sha, "samples": rows, "problem": problem}


def _scan_chunk(chunk, mode):
    return [_scan_shard(p, known, mode) for p, known in chunk]


def scan_shards(
    shards,
    index_dir=None,
    report_dir=None,
    verbose: bool = True,
    scan: str = "content",
    progress: bool | None = None,
) -> ShardSet:
    """Index and check tar shards (in the order given). Same arguments as :func:`conmim.data.scan_folder`;
    excluded samples are named ``SHARD:KEY``, a shard that cannot be read ``SHARD``.

    Raises:
        FileNotFoundError: a shard does not exist.
        ValueError: no usable sample, or an unknown ``scan``.
    """
    scanmod._check_mode(scan)
    bar = verbose if progress is None else progress
    shards = [os.path.abspath(os.path.expanduser(os.fspath(s))) for s in shards]
    if not shards:
        raise ValueError("shards: no tar file given")
    for s in shards:
        if not os.path.isfile(s):
            raise FileNotFoundError(f"shard {printable(s)!r} does not exist or is not a file")
    root = Path(os.path.commonpath(shards))
    root = root if root.is_dir() else root.parent
    jobs_mode = scan
    source = Path("shards:" + "\n".join(shards))
    index_path = None if scan == "off" else scanmod._index_path(source, index_dir, report_dir)

    def check(cache):
        jobs = [(s, cache.get(s)) for s in shards]
        fn = partial(_scan_chunk, mode=jobs_mode)
        return dict(zip(shards, scanmod.run_checks(jobs, fn, bar, "checking shards", chunk=1)))

    if index_path is None:
        entries = check({})
    else:
        waiting_since = time.time()
        with exclusive(index_path.with_suffix(".lock")):
            doc = scanmod._load_index_doc(index_path, source)
            files = doc.get("files", {})
            # another rank finished scanning these shards while this one waited: take its result
            fresh = doc.get("written", 0) >= waiting_since and doc.get("mode") in (scan, "content")
            if fresh and all(s in files for s in shards):
                entries = files
            else:
                entries = check(files)
                scanmod.save_index(index_path, source, entries, mode=scan)

    found = ShardSet(root, shards)
    labels: list[int | None] = []
    for n, s in enumerate(shards):
        e = entries[s]
        if e.get("problem"):
            found.bad.append((printable(s), e["problem"]))
        for k, off, size, label, bad in e["samples"]:
            if bad is None:
                found.samples.append((n, k, off, size))
                labels.append(label)
            else:
                found.bad.append((printable(f"{s}:{k}"), bad))
    labelled = bool(labels) and all(lab is not None for lab in labels)
    found.labels = [lab if labelled else -1 for lab in labels]
    found.classes = [str(c) for c in sorted(set(found.labels))] if labelled else []
    if verbose:
        for p, why in found.bad:
            scanmod.log.warning("excluding %s: %s", p, why)
    if not found.samples:
        more = f"; {len(found.bad)} excluded, e.g. {found.bad[0][0]}: {found.bad[0][1]}" if found.bad else ""
        raise ValueError(f"shards under {printable(root)!r} hold no usable image sample{more}")
    if report_dir is not None:
        scanmod.write_bad_files(report_dir, found.bad)
    return found
