"""Files that used to hang or stop a run: link loops, unreadable folders, content changed in place, GIFs and
decompression bombs under image names, non-UTF-8 names; and every image kind decoded alike by torch and DALI.

Only the public names that existed before these fixes are used, so each case also runs against the old code.
"""

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conmim.data import ViewConfig, build_loader, dali_status, scan_folder, write_bad_files
from conmim.data.views import load_rgb

HAS_DALI = dali_status() is None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason=f"optional dependency missing: {dali_status()}")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]
SMALL = ViewConfig(image_size=32)


def _rgb(seed, h=24, w=40):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr, fmt="PNG", **kw):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def _tree(root: Path, n=4) -> list[Path]:
    """n random PNGs in two class folders."""
    return [_save(root / ("a" if i % 2 else "b") / f"{i}.png", _rgb(i)) for i in range(n)]


def _png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): gray, RGB or RGBA."""
    h, w = arr.shape[:2]
    color = 0 if arr.ndim == 2 else {2: 4, 3: 2, 4: 6}[arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _scan_in_thread(root, timeout=60, **kw):
    """scan_folder with a deadline: a hang fails the test instead of stalling the suite."""
    box = {}

    def go():
        try:
            box["folder"] = scan_folder(root, **kw)
        except BaseException as exc:  # reported below
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the scan of {root} did not finish in {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["folder"]


def _excluded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "conmim.data" and r.levelname == "WARNING"]


# ----------------------------------------------------------------------------------------------- link loops
LOOPS = {
    "one link to the root": [("a/up", "..")],
    "two self-referencing links": [("a/up", ".."), ("b/self", ".")],
    "a file linked twice and a link to itself": [("b/again.png", "0.png"), ("b/me.png", "me.png")],
}


@pytest.mark.parametrize("links", list(LOOPS.values()), ids=list(LOOPS))
def test_link_loops_end_and_list_each_real_file_once(tmp_path, links):
    root = tmp_path / "data"
    _tree(root)
    for name, target in links:
        (root / name).symlink_to(target)
    folder = _scan_in_thread(root, index_dir=tmp_path / "idx", verbose=False)
    real = sorted(os.path.realpath(f) for f in folder.files)
    assert len(real) == len(set(real)) == 4, folder.files
    assert folder.classes == ["a", "b"]


# ------------------------------------------------------------------------------------------ unreadable folder
def test_unreadable_folder_is_reported_like_a_bad_file(tmp_path, monkeypatch, caplog):
    """Run as root here, so a mode-000 folder stays readable: the denial is injected where the walk lists a
    folder (``os.scandir``, which ``os.walk`` uses too)."""
    root = tmp_path / "data"
    _tree(root)
    locked = root / "locked"
    _save(locked / "hidden.png", _rgb(9))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).rstrip(os.sep) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    folder = _scan_in_thread(root, index_dir=tmp_path / "idx", report_dir=tmp_path / "run")
    assert len(folder) == 4
    listed = (tmp_path / "run" / "bad_files.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[0].rstrip("/") for line in listed] == [str(locked)]
    assert "Permission denied" in listed[0]
    assert any(str(locked) in line and "Permission denied" in line for line in _excluded(caplog))


# ----------------------------------------------------------------------------------- content changed in place
@pytest.mark.parametrize("damage", ["zeroed tail", "inverted header"])
def test_content_changed_in_place_with_size_and_mtime_kept_is_rechecked(tmp_path, damage):
    root = tmp_path / "data"
    files = _tree(root)
    scan_folder(root, index_dir=tmp_path / "idx", verbose=False)
    target = files[0]
    st = target.stat()
    data = bytearray(target.read_bytes())
    part = slice(len(data) // 3, None) if damage == "zeroed tail" else slice(0, 16)
    data[part] = bytes(0 if damage == "zeroed tail" else 255 - b for b in data[part])
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    folder = scan_folder(root, index_dir=tmp_path / "idx", verbose=False)
    assert [Path(p).name for p, _ in folder.bad] == [target.name]
    assert str(target) not in folder.files
    L = build_loader(root, 1, SMALL, loader="torch", num_workers=0, verbose=False)
    assert sum(1 for _ in L) == 3  # the loader no longer meets the damaged file


# ------------------------------------------------------------------------------------- formats no loader reads
def _gif(path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_rgb(5)).save(buf, format="GIF")
    path.write_bytes(buf.getvalue())
    return path


def _bomb(path: Path) -> Path:
    """A PNG of a few dozen bytes whose header claims 20000 x 20000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + b"\xaeB`\x82")
    return path


BAD_KINDS = {
    "gif named .png": (lambda d: _gif(d / "anim.png"), "GIF"),
    "gif named .jpg": (lambda d: _gif(d / "anim.jpg"), "GIF"),
    "decompression bomb": (lambda d: _bomb(d / "bomb.png"), "decompression bomb"),
    "ico named .png": (lambda d: _save(d / "icon.png", _rgb(3, 16, 16), fmt="ICO"), "ICO"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_unreadable_formats_are_bad_files_and_the_epoch_completes(tmp_path, kind, loader, caplog):
    root = tmp_path / "data"
    _tree(root)
    make, word = BAD_KINDS[kind]
    path = make(root / "a")
    L = build_loader(root, 2, SMALL, loader=loader, num_workers=0, run_dir=tmp_path / "run")
    bad = dict(L.folder.bad)
    assert list(bad) == [str(path)] and word in bad[str(path)], bad
    assert sum(s.shape[0] for s, _, _ in L) == 4
    assert str(path) in (tmp_path / "run" / "bad_files.tsv").read_text()
    assert any(str(path) in line for line in _excluded(caplog))


# ------------------------------------------------------------------------------------------- non-UTF-8 names
NAMES = [b"caf\xe9.png", b"\xff\xfe.png", b"tab\there.png", b"new\nline.png"]


@pytest.mark.parametrize("name", NAMES, ids=["latin-1", "invalid bytes", "tab", "newline"])
def test_any_file_name_reaches_the_report_and_both_loaders(tmp_path, name):
    root = tmp_path / "data"
    _tree(root, n=3)
    good = Path(os.fsdecode(os.path.join(os.fsencode(root / "a"), name)))
    _save(good, _rgb(7))
    bad = Path(os.fsdecode(os.path.join(os.fsencode(root / "b"), b"bad-" + name)))
    bad.write_bytes(b"")
    folder = scan_folder(root, index_dir=tmp_path / "idx", report_dir=tmp_path / "run", verbose=False)
    assert str(good) in folder.files
    text = (tmp_path / "run" / "bad_files.tsv").read_bytes().decode("utf-8")  # valid UTF-8
    lines = text.splitlines()
    assert len(lines) == 2 and lines[1].count("\t") == 1, lines
    assert "bad-" in lines[1] and lines[1].endswith("\tempty file")
    write_bad_files(tmp_path / "run2", [(str(bad), f"undecodable: {bad} is broken")])
    assert len((tmp_path / "run2" / "bad_files.tsv").read_bytes().decode("utf-8").splitlines()) == 2


@pytest.mark.parametrize("loader", LOADERS)
def test_non_utf8_names_load_through_both_loaders(tmp_path, loader):
    root = tmp_path / "data"
    root.mkdir()
    for i, name in enumerate([b"caf\xe9.png", b"\xff.png", b"plain.png", b"x\xc3(.png"]):
        _save(Path(os.fsdecode(os.path.join(os.fsencode(root), name))), _rgb(i))
    L = build_loader(root, 2, SMALL, loader=loader, num_workers=0, shuffle=False, verbose=False)
    seen = []
    for s, _, _ in L:
        seen += L.last_indices.tolist()
        assert torch.isfinite(s).all()
    assert sorted(seen) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------- image kinds
def _kind(path: Path, kind: str) -> tuple[Path, np.ndarray]:
    """Writes one image of ``kind`` under ``path``'s folder; returns it with the RGB uint8 pixels a decoder
    should give (16-bit samples as round(x / 257), alpha dropped, gray repeated)."""
    from PIL import Image

    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    u16 = rng.integers(0, 65536, (24, 40, 4), dtype=np.uint16)
    to8 = ((u16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    d = path
    if kind == "png16-gray":
        return _png16(d / "g16.png", u16[..., 0]), np.repeat(to8[..., :1], 3, 2)
    if kind == "png16-rgb":
        return _png16(d / "rgb16.png", u16[..., :3]), to8[..., :3]
    if kind == "png16-rgba":
        return _png16(d / "rgba16.png", u16), to8[..., :3]
    if kind == "tiff16-gray":
        Image.fromarray(u16[..., 0]).save(d / "g16.tif")
        return d / "g16.tif", np.repeat(to8[..., :1], 3, 2)
    if kind == "png-gray":
        return _save(d / "g.png", rgb[..., 0]), np.repeat(rgb[..., :1], 3, 2)
    if kind == "png-rgba":
        rgba = np.dstack([rgb, rng.integers(0, 256, (24, 40, 1), dtype=np.uint8)])
        return _save(d / "rgba.png", rgba), rgb
    if kind == "png-gray-alpha":
        return _save(d / "la.png", np.dstack([rgb[..., 0], rgb[..., 1]])), np.repeat(rgb[..., :1], 3, 2)
    if kind == "png-palette":
        im = Image.fromarray(rgb).convert("P")
        im.save(d / "p.png")
        return d / "p.png", np.asarray(im.convert("RGB"))
    if kind == "tiff":
        return _save(d / "rgb.tiff", rgb, fmt="TIFF"), rgb
    if kind == "bmp":
        return _save(d / "rgb.bmp", rgb, fmt="BMP"), rgb
    if kind == "webp-lossless":
        return _save(d / "rgb.webp", rgb, fmt="WEBP", lossless=True), rgb
    if kind == "jpeg-gray":  # lossy: the reference is the decoders' agreement below, not these pixels
        return _save(d / "g.jpg", rgb[..., 0], fmt="JPEG", quality=95), None
    if kind == "jpeg-cmyk":
        Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
        return d / "cmyk.jpg", None
    raise AssertionError(kind)


KINDS = ["png16-gray", "png16-rgb", "png16-rgba", "tiff16-gray", "png-gray", "png-rgba", "png-gray-alpha"]
KINDS += ["png-palette", "tiff", "bmp", "webp-lossless", "jpeg-gray", "jpeg-cmyk"]


def _dali_decode(paths: list[Path]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        encoded, _ = fn.readers.file(files=[str(p) for p in paths])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = pipe(batch_size=len(paths), num_threads=1, device_id=None)
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i]) for i in range(len(paths))]


@pytest.mark.parametrize("kind", KINDS)
def test_torch_decode_gives_the_expected_pixels(tmp_path, kind):
    path, want = _kind(tmp_path, kind)
    got = load_rgb(path).permute(1, 2, 0).numpy()
    assert got.shape == (24, 40, 3) and got.dtype == np.uint8
    if want is not None:
        assert np.abs(got.astype(int) - want).max() <= 0, f"{kind}: torch decode differs from the source"


@needs_dali
def test_torch_and_dali_decode_every_kind_alike(tmp_path):
    made = [_kind(tmp_path, k)[0] for k in KINDS]
    for kind, path, d in zip(KINDS, made, _dali_decode(made)):
        t = load_rgb(path).permute(1, 2, 0).numpy()
        assert t.shape == d.shape, kind
        diff = np.abs(t.astype(int) - d.astype(int))
        assert diff.max() <= 1, (
            f"{kind}: torch and DALI differ by up to {diff.max()} (mean {diff.mean():.3f})"
        )


def _dali_decode_gray(paths: list[Path]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        encoded, _ = fn.readers.file(files=[str(p) for p in paths])
        return fn.decoders.image(encoded, device="cpu", output_type=types.GRAY)

    p = pipe(batch_size=len(paths), num_threads=1, device_id=None)
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i])[..., 0] for i in range(len(paths))]


@needs_dali
def test_torch_and_dali_decode_every_kind_alike_in_grayscale(tmp_path):
    from conmim.data.views import load_image

    made = [_kind(tmp_path, k)[0] for k in KINDS]
    for kind, path, d in zip(KINDS, made, _dali_decode_gray(made)):
        t = load_image(path, channels=1)[0].numpy()
        diff = np.abs(t.astype(int) - d.astype(int))
        assert diff.max() <= 1, f"{kind}: torch and DALI grayscale differ by up to {diff.max()}"


# --------------------------------------------------------------------------------------------- one channel
@pytest.mark.parametrize("loader", LOADERS)
def test_one_channel_views_with_their_own_mean_and_std(tmp_path, loader):
    root = tmp_path / "data"
    _tree(root, n=4)
    _kind(root / "a", "png16-gray")
    views = ViewConfig(image_size=32, channels=1, mean=(0.4,), std=(0.2,), jitter_p=1.0, gray_p=1.0)
    L = build_loader(root, 5, views, loader=loader, num_workers=0, verbose=False)
    s, t, _ = next(iter(L))
    assert s.shape == t.shape == (5, 1, 32, 32)
    assert s.min() >= (0 - 0.4) / 0.2 - 1e-4 and s.max() <= (1 - 0.4) / 0.2 + 1e-4
    assert not torch.allclose(s, t), "the teacher view is still perturbed (brightness, contrast)"


def test_view_config_checks_channels_mean_and_std():
    assert ViewConfig().mean == (0.485, 0.456, 0.406) and ViewConfig(channels=1).std == (0.25,)
    with pytest.raises(ValueError, match="channels must be 1"):
        ViewConfig(channels=4)
    with pytest.raises(ValueError, match="one value per channel"):
        ViewConfig(channels=1, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="std must be finite and positive"):
        ViewConfig(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean must be a sequence"):
        ViewConfig(mean="abc")


# ------------------------------------------------------------------------------------------------ scan modes
def test_stat_mode_trusts_the_index_but_sees_a_rewrite_through_ctime(tmp_path, monkeypatch):
    from conmim.data import scan as scanmod

    root = tmp_path / "data"
    files = _tree(root)
    scan_folder(root, index_dir=tmp_path / "idx", verbose=False, scan="stat")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    scan_folder(root, index_dir=tmp_path / "idx", verbose=False, scan="stat")
    assert not [p for p in reads if str(p).endswith(".png")], "a warm stat scan reads no image"
    monkeypatch.undo()
    st = files[1].stat()
    files[1].write_bytes(bytes(st.st_size))
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    folder = scan_folder(root, index_dir=tmp_path / "idx", verbose=False, scan="stat")
    assert [p for p, _ in folder.bad] == [str(files[1])]
    with pytest.raises(ValueError, match="scan must be one of"):
        scan_folder(root, scan="fast")
    assert scanmod.SCANS == ("content", "stat", "off")


@pytest.mark.parametrize("loader", LOADERS)
def test_scan_off_lists_without_checking_and_a_bad_file_stops_with_one_line(tmp_path, loader):
    root = tmp_path / "data"
    _tree(root, n=3)
    (root / "a" / "zz-bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    folder = scan_folder(root, index_dir=tmp_path / "idx", verbose=False, scan="off")
    assert len(folder) == 4 and not folder.bad and not (tmp_path / "idx").exists()
    want = r"cannot decode .*zz-bad\.png" if loader == "torch" else r"DALI stopped on a file it cannot read"
    with pytest.raises(RuntimeError, match=want) as info:
        L = build_loader(
            root, 4, SMALL, loader=loader, num_workers=0, shuffle=False, verbose=False, scan="off"
        )
        next(iter(L))
    assert "\n" not in str(info.value)


def test_parallel_scan_gives_the_in_process_verdicts_and_a_progress_bar(tmp_path, monkeypatch, capsys):
    from conmim.data import scan as scanmod

    root = tmp_path / "data"
    _tree(root, n=6)
    _gif(root / "a" / "g.png")
    (root / "b" / "e.jpg").write_bytes(b"")
    one = scan_folder(root, index_dir=tmp_path / "i1", verbose=False)
    monkeypatch.setattr(scanmod, "PARALLEL_MIN", 1)
    monkeypatch.setattr(scanmod, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(scanmod, "workers", lambda: 2)
    many = scan_folder(root, index_dir=tmp_path / "i2", verbose=False, progress=True)
    assert (many.files, many.bad, many.labels) == (one.files, one.bad, one.labels) and len(many.bad) == 2
    assert "checking images" in capsys.readouterr().err
    scan_folder(root, index_dir=tmp_path / "i3", verbose=False)
    assert "checking images" not in capsys.readouterr().err, "no bar unless asked for"
