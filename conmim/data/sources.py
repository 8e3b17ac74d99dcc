"""What ``--data`` may name, resolved once: an image folder, a file list, tar shards, or a bundled sample set.

``resolve_data(spec)`` decides the kind without reading any image:

- ``samples:photos`` / ``samples:mnist``: the bundled sets (built once, see :mod:`conmim.data.samples`);
- a folder: an image folder (searched recursively);
- ``DIR/*.tar``, ``DIR/shard-*.tar`` (a glob) or ``DIR/shard-{000000..001023}.tar`` (a brace pattern, also
  ``{a,b,c}``) or a single ``.tar`` file: tar shards in the WebDataset layout;
- any other file: a file list (one image path per line, see :func:`conmim.data.scan.scan_list`).
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from conmim.data.scan import printable, scan_folder, scan_list

KINDS = ("folder", "list", "shards")


@dataclass(frozen=True)
class DataSource:
    """A resolved ``--data``: ``kind`` is "folder", "list" or "shards"; ``path`` the folder or list file (for
    shards, their common folder); ``shards`` the tar files in order; ``spec`` what the user wrote."""

    kind: str
    path: Path
    shards: tuple[str, ...] = ()
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return self.spec or str(self.path)


def expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b{x,y}`` -> a000bx, a000by, a001bx, ... (numeric ranges keep their zero padding)."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = []
    for part in parts:
        m = re.fullmatch(r"\{(-?\d+)\.\.(-?\d+)\}", part)
        if m:
            a, b = m.group(1), m.group(2)
            width = len(a) if a.startswith("0") or len(a) == len(b) else 0
            lo, hi = int(a), int(b)
            step = 1 if hi >= lo else -1
            choices.append([f"{i:0{width}d}" for i in range(lo, hi + step, step)])
        elif part.startswith("{") and part.endswith("}") and "," in part:
            choices.append(part[1:-1].split(","))
        else:
            choices.append([part])
    return ["".join(c) for c in itertools.product(*choices)]


def resolve_data(spec) -> DataSource:
    """The data source ``spec`` names (see the module's doc). Writes nothing, except that ``samples:...``
    builds the bundled set on first use.

    Raises:
        FileNotFoundError: the folder, list or a shard does not exist, or a pattern matches nothing.
        ValueError: an unknown ``samples:`` set, or a pattern matching files that are not ``.tar``.
    """
    if isinstance(spec, DataSource):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data must be a path or a string, got {type(spec).__name__}")
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith("samples:"):
        from conmim.data import samples

        which = text.split(":", 1)[1]
        if which not in ("photos", "mnist"):
            raise ValueError(f"data {text!r}: the bundled sets are samples:photos and samples:mnist")
        built = samples.build(samples.default_dest(), photos=which == "photos", mnist=which == "mnist")
        return DataSource("folder", Path(built["photos" if which == "photos" else "mnist_train"]), spec=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return DataSource("folder", path.resolve(), spec=text)
    if path.is_file() and path.suffix.lower() != ".tar":
        return DataSource("list", path.resolve(), spec=text)
    expanded = os.path.expanduser(text)
    if path.is_file():
        names = [expanded]
    elif re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", expanded) or glob.has_magic(expanded):
        names = []
        for p in expand_braces(expanded):
            names += sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not names:
            raise FileNotFoundError(f"data {printable(text)!r}: the pattern matches no file")
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"data {printable(text)!r}: shard {printable(missing[0])!r} does not exist{more}"
            )
    else:
        raise FileNotFoundError(
            f"data {printable(text)!r} does not exist: expected an image folder, a file list, tar shards "
            "(DIR/*.tar or a brace pattern) or samples:photos|samples:mnist"
        )
    not_tar = [n for n in names if not n.lower().endswith(".tar")]
    if not_tar:
        raise ValueError(
            f"data {printable(text)!r}: shards must be .tar files, got {printable(not_tar[0])!r}"
        )
    shards = tuple(os.path.abspath(n) for n in names)
    root = Path(os.path.commonpath(shards))
    return DataSource("shards", root if root.is_dir() else root.parent, shards, text)


def scan_source(
    source,
    index_dir=None,
    report_dir=None,
    verbose: bool = True,
    scan: str = "content",
    progress: bool | None = None,
):
    """Scan what :func:`resolve_data` returned: an ``ImageFolder`` (folder, list) or a ``ShardSet`` (shards)."""
    source = resolve_data(source)
    if source.kind == "folder":
        return scan_folder(source.path, index_dir, report_dir, verbose, scan, progress)
    if source.kind == "list":
        return scan_list(source.path, index_dir, report_dir, verbose, scan, progress)
    from conmim.data.shards import scan_shards

    return scan_shards(list(source.shards), index_dir, report_dir, verbose, scan, progress)
