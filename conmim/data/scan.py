"""Finding and checking images: folders, file lists; bad files excluded and reported, never a traceback.

DALI aborts a whole pipeline on one undecodable file and cannot skip inside the pipeline, so every file is
checked before any loader is built: it must decode, in a format both loaders read (JPEG, PNG, TIFF, BMP, WebP,
whatever its extension says), within Pillow's decompression-bomb limit.

The walk follows symbolic links to folders but visits each real folder once and lists each real file once
(by device and inode), so link loops end; a folder it cannot read is reported like a bad file.

Verdicts are cached in an index, one file per scanned source, in the cache folder (``$XDG_CACHE_HOME/conmim``,
by default ``~/.cache/conmim``). Modes (``scan=``):

- ``"content"`` (default): every file is read on every scan and its digest (BLAKE2b) compared with the index;
  only new or changed content is decoded again. Catches a file rewritten in place with its size and times kept.
- ``"stat"``: a file whose (size, mtime, ctime) match the index is trusted without reading it (fast on a warm
  index; a change below the file system, such as bit rot, goes unseen).
- ``"off"``: no check at all, for trusted data: the folder is only listed. A bad file then stops DALI with its
  own error naming the file, and the torch loader with an error naming it.

Processes scanning the same source at once (the ranks of a run, or two runs) take turns under a lock beside the
index, so the first checks the files and the others read its index. Large scans run in parallel over the cores
and show a progress bar once they take more than a few seconds. A source with no usable image is an error before
any training work starts. Excluded files are logged as plain lines on the ``conmim.data`` logger.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import stat as statmod
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from conmim._fs import cache_dir, exclusive, write_atomic

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
# The formats Pillow (torch loader) and DALI's decoder both read; Pillow's name for each.
FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP")
SCANS = ("content", "stat", "off")
BAD_FILES_NAME = "bad_files.tsv"
_INDEX_VERSION = 2
PARALLEL_MIN = 512  # fewer files than this are checked in-process (a pool costs more than it saves)
PROGRESS_DELAY_S = 3.0
log = logging.getLogger("conmim.data")


@dataclass
class ImageFolder:
    """A scanned folder or file list: usable files, integer labels (class sub-folders or the list's label
    column; -1 when there are none), class names, and the excluded files with the reason for each."""

    root: Path
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def printable(text) -> str:
    """``text`` (a path or a message holding one) as valid UTF-8 on one line: bytes that are not UTF-8 as
    ``\\xNN``, tabs, newlines and backslashes escaped, so a report line is one line with one tab."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    text = str(text).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def check_bytes(data: bytes) -> str | None:
    """None if ``data`` decodes as an image both loaders read, else the reason it does not."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette remarks: the verdict is what counts
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in FORMATS:
                    return f"unsupported format {img.format} (readable: {', '.join(FORMATS)})"
                img.draft(
                    "RGB", (64, 64)
                )  # JPEG: decode at reduced scale; every entropy-coded byte is still read
                img.load()
                if img.width < 1 or img.height < 1:
                    return "image has no pixels"
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Image.DecompressionBombError as exc:
        return f"decompression bomb: {exc}"
    except Exception as exc:  # a broken file can raise anything from a decoder plugin
        text = printable(exc) or type(exc).__name__
        if "truncated" in text.lower():
            return f"truncated: {text}"
        return f"undecodable: {text}"
    return None


def check_image(path: str | os.PathLike) -> str | None:
    """None if the file decodes as an image both loaders read, else the reason it does not (empty, truncated,
    not an image, unsupported format, decompression bomb, unreadable)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return check_bytes(data)


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# ------------------------------------------------------------------------------------------------------ walking
def walk_images(root: Path) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, str]]]:
    """(files, problems) under ``root``: files as (path relative to root, stat) sorted by path, each real file
    (device, inode) once; problems as (path, reason) for folders that cannot be read and links that lead
    nowhere. Hidden entries (leading dot) are skipped. Symbolic links to folders are followed, each real folder
    entered once, so a link loop ends."""
    files: list[tuple[str, os.stat_result]] = []
    problems: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    st = root.stat()
    seen_dirs.add((st.st_dev, st.st_ino))
    stack = [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root, rel) if rel else str(root)
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append((here + os.sep, f"unreadable folder: {exc.strerror or exc}"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            erel = f"{rel}/{e.name}" if rel else e.name
            try:
                est = e.stat()  # follows links
            except OSError as exc:
                if e.name.lower().endswith(EXTENSIONS) or e.is_symlink():
                    problems.append((e.path, f"unreadable: {exc.strerror or exc}"))
                continue
            ident = (est.st_dev, est.st_ino)
            if statmod.S_ISDIR(est.st_mode):
                if ident not in seen_dirs:
                    seen_dirs.add(ident)
                    subdirs.append(erel)
            elif (
                statmod.S_ISREG(est.st_mode)
                and e.name.lower().endswith(EXTENSIONS)
                and ident not in seen_files
            ):
                seen_files.add(ident)
                files.append((erel, est))
        stack.extend(reversed(subdirs))
    files.sort(key=lambda f: f[0])
    return files, problems


# ----------------------------------------------------------------------------------------------------- checking
def _check_one(path: str, known: dict | None, mode: str) -> dict:
    """Verdict for one file: {"key", "sha", "bad"}; ``known`` is the index's entry (reused when its content or,
    in "stat" mode, its key still matches)."""
    try:
        key = _stat_key(os.stat(path))
    except OSError as exc:
        return {"key": None, "sha": None, "bad": f"unreadable: {exc.strerror or exc}"}
    if mode == "stat" and known is not None and known.get("key") == key:
        return known
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return {"key": key, "sha": None, "bad": f"unreadable: {exc.strerror or exc}"}
    sha = digest(data)
    if known is not None and known.get("sha") == sha:
        return {"key": key, "sha": sha, "bad": known.get("bad")}
    return {"key": key, "sha": sha, "bad": check_bytes(data)}


def _check_chunk(chunk: list[tuple[str, dict | None]], mode: str) -> list[dict]:
    return [_check_one(p, known, mode) for p, known in chunk]


def workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_checks(
    jobs: list[tuple], fn, verbose: bool, desc: str, n_workers: int | None = None, chunk: int = 64
) -> list:
    """``fn(chunk_of_jobs) -> results`` over ``jobs`` in order: in-process for a few jobs, else over a process
    pool of ``n_workers`` (default: the usable cores); a progress bar once it takes over a few seconds."""
    from tqdm import tqdm

    n_workers = n_workers or workers()
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    bar = tqdm(
        total=len(jobs),
        desc=desc,
        unit="file",
        delay=PROGRESS_DELAY_S,
        disable=not verbose or not jobs,
        file=sys.stderr,
        leave=False,
    )
    out: list = []
    with bar:
        if n_workers <= 1 or len(jobs) < PARALLEL_MIN:
            for c in chunks:
                out += fn(c)
                bar.update(len(c))
        else:
            import multiprocessing as mp

            # fork: the workers need nothing but this module, and start in milliseconds
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else None)
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                for c, res in zip(chunks, pool.map(fn, chunks)):
                    out += res
                    bar.update(len(c))
    return out


def _check_paths(
    paths: list[str], cache: dict, mode: str, verbose: bool, keys: list | None = None
) -> dict[str, dict]:
    """Verdict per path; ``keys``: the walk's stat keys, with which a "stat" scan settles unchanged files here,
    without a worker."""
    from functools import partial

    out: dict[str, dict] = {}
    jobs = []
    for i, p in enumerate(paths):
        known = cache.get(p)
        if mode == "stat" and keys is not None and known is not None and known.get("key") == keys[i]:
            out[p] = known
        else:
            jobs.append((p, known))
    results = run_checks(jobs, partial(_check_chunk, mode=mode), verbose, "checking images")
    out.update(zip((p for p, _ in jobs), results))
    return {p: out[p] for p in paths}


# ------------------------------------------------------------------------------------------------------ sources
def scan_folder(
    root,
    index_dir=None,
    report_dir=None,
    verbose: bool = True,
    scan: str = "content",
    progress: bool | None = None,
) -> ImageFolder:
    """Scan ``root`` recursively for images (.jpg/.jpeg/.png/.webp/.tif/.tiff/.bmp) and check each one.

    Labels: when every image sits in a first-level sub-folder, the sub-folder names are the classes (sorted);
    otherwise the tree is flat and every label is -1.

    Args:
        root: the image folder.
        index_dir: where the cached index lives (default: the cache folder).
        report_dir: if given, the excluded files are listed there in ``bad_files.tsv`` (path, reason).
        verbose: log one line per excluded file, naming it and the reason.
        scan: "content", "stat" or "off" (see the module's doc).
        progress: a progress bar on stderr once the checks take more than a few seconds (default: ``verbose``).

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no usable image was found (the message says how many files were excluded and why), or an
            unknown ``scan``.
    """
    _check_mode(scan)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {printable(root)!r} does not exist or is not a folder")

    def listing():
        listed, problems = walk_images(root)
        paths = [os.path.join(root, r) for r, _ in listed]
        return paths, [_stat_key(st) for _, st in listed], problems

    bar = verbose if progress is None else progress
    paths, verdicts, problems = _verdicts(root, listing, index_dir, report_dir, scan, bar, True)
    rels = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    good = [r for r, p in zip(rels, paths) if verdicts[p] is None]
    bad = [(printable(p), why) for p, why in problems]
    bad += [(printable(p), verdicts[p]) for p in paths if verdicts[p] is not None]
    top = {r.split("/", 1)[0] for r in good if "/" in r}
    nested = bool(good) and all("/" in r for r in good)
    classes = sorted(top) if nested else []
    cls_idx = {c: i for i, c in enumerate(classes)}
    labels = [cls_idx[r.split("/", 1)[0]] for r in good] if nested else [-1] * len(good)
    what = f"data folder {printable(root)!r}"
    if not good and not bad and any(root.glob("*.tar")):
        what += f" (it holds .tar files: for shards give {printable(root / '*.tar')!r})"
    return _finish(
        ImageFolder(root, [os.path.join(root, r) for r in good], labels, classes, bad),
        what,
        report_dir,
        verbose,
    )


def scan_list(
    list_file,
    index_dir=None,
    report_dir=None,
    verbose: bool = True,
    scan: str = "content",
    progress: bool | None = None,
):
    """Scan a file list: a text file with one image path per line, relative paths taken from the list's own
    folder, blank lines and lines starting with ``#`` skipped. A line may end in an integer label after a tab
    or spaces (``train/n01440764/x.JPEG 0``); the labels are used when every line has one. Paths that are
    missing or do not decode are excluded and reported like a folder's. Same arguments as :func:`scan_folder`.
    """
    _check_mode(scan)
    list_file = Path(list_file).expanduser().resolve()
    if not list_file.is_file():
        raise FileNotFoundError(f"file list {printable(list_file)!r} does not exist or is not a file")
    base = list_file.parent
    entries: list[tuple[str, int | None]] = []
    with open(list_file, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            path, label = line, None
            if "\t" in line:
                path, _, tail = line.rpartition("\t")
                label = int(tail) if re.fullmatch(r"-?\d+", tail.strip()) else None
                path = path if label is not None else line
            else:
                m = re.fullmatch(r"(.+?)\s+(-?\d+)\s*", line)
                if m and not os.path.lexists(os.path.join(base, line)):
                    path, label = m.group(1), int(m.group(2))
            entries.append((os.path.normpath(os.path.join(base, path.strip())), label))
    seen: set[str] = set()
    unique = [(p, lab) for p, lab in entries if not (p in seen or seen.add(p))]
    bar = verbose if progress is None else progress
    _, verdicts, _ = _verdicts(
        list_file, lambda: ([p for p, _ in unique], None, []), index_dir, report_dir, scan, bar, False
    )
    paths = [p for p, _ in unique]
    good = [(p, lab) for p, lab in unique if verdicts[p] is None]
    bad = [(printable(p), verdicts[p]) for p in paths if verdicts[p] is not None]
    labelled = bool(good) and all(lab is not None for _, lab in good)
    labels = [lab if labelled else -1 for _, lab in good]
    classes = [str(c) for c in sorted(set(labels))] if labelled else []
    return _finish(
        ImageFolder(list_file, [p for p, _ in good], labels, classes, bad),
        f"file list {printable(list_file)!r}",
        report_dir,
        verbose,
    )


def _check_mode(scan: str) -> None:
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")


def _verdicts(source: Path, listing, index_dir, report_dir, scan: str, bar: bool, reuse_listing: bool):
    """(paths, {path: None (usable) or the reason it is not}, problems) through the cached index unless ``scan``
    is "off"; ``listing() -> (paths, stat keys or None, problems)`` finds the files (``reuse_listing``: a fresh
    index's file list may stand in for it, as for a folder walk; a file list is always read).

    When another process (another rank of the run) finished a scan of the same source while this one waited
    for the lock, its result is taken as it is: the ranks of a run then scan once between them, not once each.
    """
    if scan == "off":
        paths, _, problems = listing()
        return paths, dict.fromkeys(paths), problems
    index_path = _index_path(source, index_dir, report_dir)
    if index_path is None:
        paths, keys, problems = listing()
        checked = _check_paths(paths, {}, scan, bar, keys)
    else:
        waiting_since = time.time()
        with exclusive(index_path.with_suffix(".lock")):
            doc = _load_index_doc(index_path, source)
            fresh = doc.get("written", 0) >= waiting_since and doc.get("mode") in (scan, "content")
            if fresh:
                checked = doc["files"]
                paths, problems = list(checked), [tuple(x) for x in doc.get("problems", [])]
                if not reuse_listing:
                    paths = listing()[0]
                    fresh = all(p in checked for p in paths)
            if not fresh:
                paths, keys, problems = listing()
                checked = _check_paths(paths, doc.get("files", {}), scan, bar, keys)
                save_index(index_path, source, checked, problems, scan)
    return paths, {p: checked[p]["bad"] for p in paths}, problems


def _finish(found: ImageFolder, what: str, report_dir, verbose: bool) -> ImageFolder:
    if verbose:
        for p, why in found.bad:
            log.warning("excluding %s: %s", p, why)
    if (
        not found.files
    ):  # before the report: a source that cannot be trained on leaves the run folder as it was
        bad = found.bad
        more = f"; {len(bad)} file(s) were excluded, e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise ValueError(f"{what} holds no usable image ({', '.join(EXTENSIONS)}){more}")
    if report_dir is not None:
        write_bad_files(report_dir, found.bad)
    return found


def write_bad_files(report_dir, bad: list[tuple[str, str]]) -> Path:
    """``report_dir/bad_files.tsv``: a header line, then one ``path<TAB>reason`` line per excluded file, both
    made printable (see :func:`printable`: any file name, UTF-8 or not, gives one valid UTF-8 line); replaced
    atomically (a reader never sees it half written)."""
    rd = Path(report_dir)
    rd.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{printable(p)}\t{printable(why)}\n" for p, why in bad)
    return write_atomic(rd / BAD_FILES_NAME, "path\treason\n" + lines)


# -------------------------------------------------------------------------------------------------------- index
def _index_path(source: Path, index_dir, report_dir) -> Path | None:
    """The index file: in ``index_dir`` if given, else in the user's cache folder (never inside the data)."""
    cache = cache_dir()
    name = f"index-{hashlib.sha1(os.fsencode(source)).hexdigest()[:16]}.json"
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


def index_path_for(source: Path, index_dir=None, report_dir=None) -> Path | None:
    return _index_path(Path(source), index_dir, report_dir)


def _load_index_doc(path: Path | None, source: Path) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _INDEX_VERSION or data.get("root") != str(source):
        return {}
    if not isinstance(data.get("files"), dict):
        return {}
    return data


def _load_index(path: Path | None, source: Path) -> dict:
    return _load_index_doc(path, source).get("files", {})


def load_index(path: Path | None, source: Path) -> dict:
    return _load_index(path, Path(source))


def save_index(path: Path, source: Path, entries: dict, problems=(), mode: str = "content") -> None:
    """The index: the entries, the problems of the walk, the mode and when it was written (a process that
    waited for the lock meanwhile takes this result as it is)."""
    doc = {
        "version": _INDEX_VERSION,
        "root": str(source),
        "mode": mode,
        "written": time.time(),
        "problems": [list(x) for x in problems],
        "files": entries,
    }
    # json escapes the surrogates of non-UTF-8 names (\udcff) and reads them back as the same str
    with contextlib.suppress(OSError):  # a read-only location: the scan still works, it is just not cached
        write_atomic(path, json.dumps(doc))
