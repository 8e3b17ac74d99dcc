"""Image folder scanning: find the images, check each one decodes, exclude and report the bad ones.

DALI aborts a whole pipeline on one undecodable file and cannot skip inside the pipeline, so every file is
checked before any loader is built. Verdicts are cached in an index keyed by (path, size, mtime): a re-scan only
re-checks files that changed. The index lives in the cache folder (``$XDG_CACHE_HOME/conmim``, by default
``~/.cache/conmim``), one file per scanned folder; processes scanning the same folder at once (the ranks of a run,
or two runs) take turns under a lock beside it, so the first checks the files and the others read its index.
A folder with no usable image is an error before any training work starts. Excluded files are logged as plain
lines on the ``conmim.data`` logger (stderr when logging is not configured).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from conmim._fs import cache_dir, exclusive, write_atomic

EXTENSIONS = (".jpg", ".jpeg", ".png")
BAD_FILES_NAME = "bad_files.tsv"
_INDEX_VERSION = 1
log = logging.getLogger("conmim.data")


@dataclass
class ImageFolder:
    """A scanned folder: usable files (sorted), integer labels from class sub-folders (-1 for a flat tree),
    class names, and the excluded files with the reason for each."""

    root: Path
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def check_image(path: str | os.PathLike) -> str | None:
    """None if the file decodes as an image, else the reason it does not (empty, truncated, not an image...)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if size == 0:
        return "empty file"
    try:
        with Image.open(p) as img:
            img.draft(
                "RGB", (64, 64)
            )  # JPEG: decode at reduced scale; every entropy-coded byte is still read
            img.load()
            if img.width < 1 or img.height < 1:
                return "image has no pixels"
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        if "truncated" in text.lower():
            return f"truncated: {text}"
        return f"undecodable: {text}"
    return None


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if f.lower().endswith(EXTENSIONS) and not f.startswith(".")
        ]
    return out


def scan_folder(root, index_dir=None, report_dir=None, verbose: bool = True) -> ImageFolder:
    """Scan ``root`` recursively for .jpg/.jpeg/.png files and check each one.

    Labels: when every image sits in a first-level sub-folder, the sub-folder names are the classes (sorted);
    otherwise the tree is flat and every label is -1.

    Args:
        root: the image folder.
        index_dir: where the cached index lives (default: the cache folder, ``$XDG_CACHE_HOME/conmim`` or
            ``~/.cache/conmim``).
        report_dir: if given, the excluded files are listed there in ``bad_files.tsv`` (path, reason).
        verbose: log one line per excluded file, naming it and the reason.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no usable image was found (the message says how many files were excluded and why).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a folder")
    index_path = _index_path(root, index_dir, report_dir)
    if index_path is None:
        verdicts = _check_all(root, {})
    else:
        with exclusive(index_path.with_suffix(".lock")):
            verdicts = _check_all(root, _load_index(index_path, root))
            _save_index(index_path, root, verdicts)

    rels = sorted(verdicts)
    good = [r for r in rels if verdicts[r]["bad"] is None]
    bad = [(str(root / r), verdicts[r]["bad"]) for r in rels if verdicts[r]["bad"] is not None]
    top = {r.split("/", 1)[0] for r in good if "/" in r}
    nested = good and all("/" in r for r in good)
    classes = sorted(top) if nested else []
    cls_idx = {c: i for i, c in enumerate(classes)}
    labels = [cls_idx[r.split("/", 1)[0]] for r in good] if nested else [-1] * len(good)

    if verbose:
        for p, why in bad:
            log.warning("excluding %s: %s", p, why)
    if not good:  # before the report: a folder that cannot be trained on leaves the run folder as it was
        what = f"; {len(bad)} file(s) were excluded, e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise ValueError(f"data folder {str(root)!r} holds no usable .jpg/.jpeg/.png image{what}")
    if report_dir is not None:
        write_bad_files(report_dir, bad)
    return ImageFolder(root, [str(root / r) for r in good], labels, classes, bad)


def write_bad_files(report_dir, bad: list[tuple[str, str]]) -> Path:
    """``report_dir/bad_files.tsv``: a header line, then one ``path<TAB>reason`` line per excluded file; replaced
    atomically (a reader never sees it half written)."""
    rd = Path(report_dir)
    rd.mkdir(parents=True, exist_ok=True)
    return write_atomic(rd / BAD_FILES_NAME, "path\treason\n" + "".join(f"{p}\t{why}\n" for p, why in bad))


def _check_all(root: Path, cache: dict) -> dict[str, dict]:
    """Verdict per file under ``root`` (relative path -> {"key": [size, mtime_ns], "bad": reason or None}),
    taken from ``cache`` when the file's key has not changed."""
    verdicts: dict[str, dict] = {}
    for p in _walk(root):
        rel = p.relative_to(root).as_posix()
        try:
            st = p.stat()
            key = [st.st_size, st.st_mtime_ns]
        except OSError as exc:
            verdicts[rel] = {"key": None, "bad": f"unreadable: {exc.strerror or exc}"}
            continue
        hit = cache.get(rel)
        verdicts[rel] = (
            hit if hit is not None and hit.get("key") == key else {"key": key, "bad": check_image(p)}
        )
    return verdicts


def _index_path(root: Path, index_dir, report_dir) -> Path | None:
    """The index file: in ``index_dir`` if given, else in the user's cache folder (never inside the data)."""
    cache = cache_dir()
    name = f"index-{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.json"
    for d in (index_dir, cache, report_dir):
        if d is None:
            continue
        d = Path(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d / name
    return None


def _load_index(path: Path | None, root: Path) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != _INDEX_VERSION or data.get("root") != str(root):
        return {}
    return data.get("files", {})


def _save_index(path: Path, root: Path, verdicts: dict) -> None:
    with contextlib.suppress(OSError):  # a read-only location: the scan still works, it is just not cached
        write_atomic(path, json.dumps({"version": _INDEX_VERSION, "root": str(root), "files": verdicts}))
