"""Data: scanning and corrupt files, the two views (torch and DALI), masks, sharding, determinism, samples."""

import random
import shutil
from pathlib import Path

import pytest
import torch

from conmim.data import (
    MaskConfig,
    ViewConfig,
    build_loader,
    dali_loader,
    dali_status,
    samples,
    scan,
    scan_folder,
    synthetic_loader,
    write_bad_files,
)
from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD

HAS_DALI = dali_status() is None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason=f"optional dependency missing: {dali_status()}")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]
SMALL = ViewConfig(image_size=32)
NO_PERTURB = ViewConfig(image_size=32, perturb=False)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    return samples.build(tmp_path_factory.mktemp("samples"), mnist=True)


def _photo_folder(tmp_path, sample_root, n=12):
    """n real photos in two class folders, plus the awkward kinds real datasets hold: CMYK and grayscale JPEGs
    and a PNG named .jpg."""
    from PIL import Image

    root = tmp_path / "imgs"
    srcs = sorted(Path(sample_root["photos"]).iterdir())[:n]
    for i, src in enumerate(srcs):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d / src.name)
    rgb = Image.open(Path(sample_root["photos"]) / "chelsea.png").convert("RGB")
    rgb.convert("CMYK").save(root / "a" / "cmyk.jpg")
    rgb.convert("L").save(root / "b" / "gray.jpeg")
    rgb.save(root / "b" / "png_named.jpg", format="PNG")
    return root


def _bad_files(root):
    """Adds an empty file, a text file named .png and a truncated JPEG; returns name -> word in the reason."""
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.png").write_text("this is not an image")
    jpg = next(p for p in (root / "a").iterdir() if p.suffix == ".jpg" and p.name != "empty.jpg")
    (root / "b" / "truncated.jpg").write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    return {"empty.jpg": "empty", "notes.png": "not an image", "truncated.jpg": "truncated"}


# ---------------------------------------------------------------------------------------------------- scanning
def _excluded(caplog) -> list[str]:
    """The plain log lines of excluded files (logger conmim.data, WARNING)."""
    return [r.getMessage() for r in caplog.records if r.name == "conmim.data" and r.levelname == "WARNING"]


def test_scan_excludes_and_names_bad_files(tmp_path, sample_root, caplog, recwarn):
    root = _photo_folder(tmp_path, sample_root)
    expected = _bad_files(root)
    folder = scan_folder(root, index_dir=tmp_path / "idx", report_dir=tmp_path / "run")
    assert not recwarn.list, "excluded files are log lines, not Python warnings"
    lines = _excluded(caplog)
    assert len(lines) == len(expected) and all(line.startswith("excluding /") for line in lines)
    messages = " ".join(lines)
    bad = {Path(p).name: why for p, why in folder.bad}
    assert set(bad) == set(expected)
    for name, word in expected.items():
        assert word in bad[name], bad[name]
        assert name in messages
    listed = (tmp_path / "run" / "bad_files.tsv").read_text()
    assert all(name in listed for name in expected)
    assert len(folder) == 12 + 3 and folder.classes == ["a", "b"]
    assert all(Path(f).name not in expected for f in folder.files)


def test_scan_index_rechecks_only_changed_files(tmp_path, sample_root, monkeypatch, caplog):
    root = _photo_folder(tmp_path, sample_root, n=4)
    scan_folder(root, index_dir=tmp_path / "idx")
    calls = []
    real = scan.check_bytes
    monkeypatch.setattr(scan, "check_bytes", lambda data: calls.append(data) or real(data))
    scan_folder(root, index_dir=tmp_path / "idx")
    assert calls == []
    target = root / "b" / "gray.jpeg"
    target.write_bytes(b"")
    folder = scan_folder(root, index_dir=tmp_path / "idx")
    assert calls == [b""] and len(folder.bad) == 1
    assert _excluded(caplog) == [f"excluding {target}: empty file"]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir() if not p.name.endswith(".lock")) == [
        next((tmp_path / "idx").glob("index-*.json")).name
    ], "no temporary file is left beside the index"


def test_scan_errors_before_any_work(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no usable"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="1 file\\(s\\) were excluded"):
        scan_folder(tmp_path / "junk", index_dir=tmp_path / "idx", report_dir=tmp_path / "run")
    assert len(_excluded(caplog)) == 1
    assert not (tmp_path / "run").exists(), "a folder with no usable image writes no report"


# ------------------------------------------------------------------------------------------------------- views
def _first_batch(root, views, loader, seed=0, **kw):
    L = build_loader(
        root, 4, views, loader=loader, seed=seed, num_workers=kw.pop("num_workers", 0), verbose=False, **kw
    )
    return next(iter(L)), L


@pytest.mark.parametrize("loader", LOADERS)
def test_views_identical_without_perturbation_and_ranges(tmp_path, sample_root, loader):
    root = _photo_folder(tmp_path, sample_root)
    (s, t, m), _ = _first_batch(root, NO_PERTURB, loader, shuffle=False)
    assert s.shape == t.shape == (4, 3, 32, 32) and s.dtype == t.dtype == torch.float32
    assert m.shape == (4, 4) and m.dtype == torch.bool
    torch.testing.assert_close(s, t, atol=1e-5, rtol=0)
    lo = torch.tensor([(0 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    assert (s >= lo - 1e-4).all() and (s <= hi + 1e-4).all()
    (s2, t2, _), _ = _first_batch(root, SMALL, loader, shuffle=False)
    assert (t2 >= lo - 1e-4).all() and (t2 <= hi + 1e-4).all()
    assert not torch.allclose(s2, t2)  # perturbed teacher differs (p = 0.8 jitter on 4 images)


def test_forced_flip_flips_both_views(tmp_path, sample_root):
    root = _photo_folder(tmp_path, sample_root)
    base = dict(image_size=32, perturb=True, jitter_p=1.0, blur_p=0.0)
    (s0, t0, _), _ = _first_batch(root, ViewConfig(flip_p=0.0, **base), "torch", shuffle=False)
    (s1, t1, _), _ = _first_batch(root, ViewConfig(flip_p=1.0, **base), "torch", shuffle=False)
    torch.testing.assert_close(s1, s0.flip(-1))
    assert (t1 - t0.flip(-1)).abs().mean() < 0.15  # same perturbation draws except the flip's own


@needs_dali
def test_dali_forced_flip_flips_both_views(tmp_path, sample_root):
    root = _photo_folder(tmp_path, sample_root)
    (s0, t0, _), _ = _first_batch(
        root, ViewConfig(image_size=32, flip_p=0.0, perturb=False), "dali", shuffle=False
    )
    (s1, t1, _), _ = _first_batch(
        root, ViewConfig(image_size=32, flip_p=1.0, perturb=False), "dali", shuffle=False
    )
    torch.testing.assert_close(s1, s0.flip(-1))
    torch.testing.assert_close(t1, t0.flip(-1))


@pytest.mark.parametrize("loader", LOADERS)
def test_reproducible_for_a_seed(tmp_path, sample_root, loader):
    root = _photo_folder(tmp_path, sample_root)
    (a, b, m), _ = _first_batch(root, SMALL, loader, seed=3)
    (c, d, n), _ = _first_batch(root, SMALL, loader, seed=3, num_workers=2)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, d)
    assert torch.equal(m, n)
    (e, _, _), _ = _first_batch(root, SMALL, loader, seed=4)
    assert not torch.allclose(a, e)


@pytest.mark.parametrize("loader", LOADERS)
def test_two_ranks_see_every_image_once_per_epoch(tmp_path, sample_root, loader):
    root = _photo_folder(tmp_path, sample_root)  # 15 images
    (root / "a" / "gray_extra.png").write_bytes((root / "b" / "gray.jpeg").read_bytes())  # 16: divisible
    seen = []
    for rank in range(2):
        L = build_loader(
            root, 4, SMALL, loader=loader, rank=rank, world_size=2, seed=1, num_workers=0, verbose=False
        )
        L.set_epoch(0)
        mine = []
        for _ in L:
            mine += L.last_indices.tolist()
        assert len(mine) == 8
        seen.append(set(mine))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(16))


def test_drop_last_and_bad_files_in_a_run(tmp_path, sample_root, caplog):
    root = _photo_folder(tmp_path, sample_root)
    _bad_files(root)
    L = build_loader(root, 4, SMALL, loader="torch", num_workers=0, run_dir=tmp_path / "run")
    assert len(_excluded(caplog)) == 3
    assert len(L) == 15 // 4
    assert sum(1 for _ in L) == 3  # the run over a folder with bad files completes
    assert (tmp_path / "run" / "bad_files.tsv").exists()


def test_masks_per_batch_and_options(tmp_path, sample_root):
    root = _photo_folder(tmp_path, sample_root)
    L = build_loader(
        root,
        4,
        ViewConfig(image_size=64),
        MaskConfig(kind="cell", cell=2, ratio=0.5),
        loader="torch",
        num_workers=0,
        verbose=False,
    )
    _, _, m = next(iter(L))
    assert m.shape == (4, 16) and (m.sum(1) == 8).all()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_loader(root, 4, ViewConfig(image_size=40), loader="torch")
    with pytest.raises(ValueError, match="loader must be one of"):
        build_loader(root, 4, loader="fast")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(tmp_path / "nope", 4)


def test_dali_decode_device_follows_the_training_device(monkeypatch, tmp_path, sample_root):
    assert dali_loader.decode_device(None) == "cpu"
    assert dali_loader.decode_device(0) == "mixed"
    seen = {}

    class Fake:
        def __init__(self, files, cfg, batch_size, rank, world_size, seed, device_id, *a):
            seen["device_id"] = device_id

        def __len__(self):
            return 0

    import conmim.data as data

    monkeypatch.setattr(data, "DaliTwoViewLoader", Fake)
    root = _photo_folder(tmp_path, sample_root, n=2)
    build_loader(root, 2, SMALL, loader="dali", device="cpu", verbose=False)
    assert seen["device_id"] is None
    build_loader(root, 2, SMALL, loader="dali", device="cuda:1", verbose=False)
    assert seen["device_id"] == 1


def test_synthetic_loader_shapes():
    batches = list(synthetic_loader(3, 2, ViewConfig(image_size=32)))
    assert len(batches) == 2
    s, t, m = batches[0]
    assert s.shape == t.shape == (3, 3, 32, 32) and m.shape == (3, 4)


def test_samples_build(sample_root, tmp_path):
    photos = sorted(Path(sample_root["photos"]).iterdir())
    assert len(photos) >= 20
    train = list(Path(sample_root["mnist_train"]).rglob("*.png"))
    val = list(Path(sample_root["mnist_val"]).rglob("*.png"))
    assert len(train) == 4000 and len(val) == 1000
    assert sorted(p.name for p in Path(sample_root["mnist_train"]).iterdir()) == [str(d) for d in range(10)]
    folder = scan_folder(sample_root["mnist_val"], index_dir=tmp_path)
    assert folder.classes == [str(d) for d in range(10)] and not folder.bad


@pytest.mark.parametrize("loader", LOADERS)
def test_resuming_mid_epoch_gives_the_same_batches(tmp_path, sample_root, loader):
    root = _photo_folder(tmp_path, sample_root)
    full = build_loader(root, 4, SMALL, loader=loader, seed=2, num_workers=0, verbose=False)
    full.set_epoch(1)
    batches = [(s, t, m, full.last_indices.clone()) for s, t, m in full]
    resumed = build_loader(root, 4, SMALL, loader=loader, seed=2, num_workers=0, verbose=False)
    resumed.set_epoch(1, start_batch=1)
    s, t, m = next(iter(resumed))
    torch.testing.assert_close(s, batches[1][0])
    torch.testing.assert_close(t, batches[1][1])
    assert torch.equal(m, batches[1][2]) and torch.equal(resumed.last_indices, batches[1][3])
    full.set_epoch(0)
    assert not torch.equal(next(iter(full))[2], batches[0][2])  # another epoch, other masks


@pytest.mark.parametrize(
    ("loader", "workers"), [("torch", 0), ("torch", 2), pytest.param("dali", 0, marks=needs_dali)]
)
def test_iterating_leaves_the_global_rng_alone(tmp_path, sample_root, loader, workers):
    """A run resumed mid-epoch iterates its loader once more than the uninterrupted run: the global RNG state,
    which checkpoints save and restore, must not depend on that."""
    root = _photo_folder(tmp_path, sample_root)
    L = build_loader(root, 4, SMALL, loader=loader, seed=0, num_workers=workers, verbose=False)
    torch.manual_seed(5)
    random.seed(5)
    before = torch.get_rng_state(), random.getstate()
    for epoch, start in ((0, 0), (0, 1), (1, 0)):
        L.set_epoch(epoch, start)
        assert len(list(L)) == L.batches_per_epoch() - start
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


@pytest.mark.parametrize(
    "bad", [[], [("/d/a.jpg", "empty file")], [("/d/a b.png", "x"), ("/d/c.jpg", "truncated: y")]]
)
def test_write_bad_files_replaces_the_report(tmp_path, bad):
    run = tmp_path / "run"
    run.mkdir()
    (run / scan.BAD_FILES_NAME).write_text("path\treason\n/old/stale.jpg\tfrom another start\n" * 3)
    path = write_bad_files(run, bad)
    assert path == run / scan.BAD_FILES_NAME
    assert path.read_text().splitlines() == ["path\treason"] + [f"{p}\t{why}" for p, why in bad]
    assert [p.name for p in run.iterdir()] == [scan.BAD_FILES_NAME]
