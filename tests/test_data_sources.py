"""Data sources: resolve_data, file lists, tar shards (scan, both loaders, ranks, resume, bad samples), and the
conmim-shards writer."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conmim.data import (
    DataSource,
    ShardSet,
    ViewConfig,
    build_loader,
    dali_status,
    resolve_data,
    scan_list,
    scan_shards,
)
from conmim.data.sources import expand_braces
from conmim.shards import main as shards_main
from conmim.shards import write_shards

HAS_DALI = dali_status() is None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason=f"optional dependency missing: {dali_status()}")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]
SMALL = ViewConfig(image_size=32)


def _png(seed: int, fmt="PNG", size=None) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size or rng.integers(20, 48, 2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = root / ("a" if i % 2 else "b") / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_png(i))
        out.append(p)
    return sorted(out)


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _shards(root: Path, counts: list[int], bad: dict[int, bytes] | None = None) -> list[Path]:
    """Shards with the given sample counts; sample numbers run across shards; ``bad`` replaces some images
    (by sample number) with the bytes given."""
    root.mkdir(parents=True, exist_ok=True)
    out, n = [], 0
    for s, count in enumerate(counts):
        samples = []
        for _ in range(count):
            data = (bad or {}).get(n, _png(n))
            samples.append(
                (f"dir/s{n:04d}", {"jpg" if n % 3 == 0 else "png": data, "cls": str(n % 2).encode()})
            )
            n += 1
        out.append(_tar(root / f"shard-{s:03d}.tar", samples))
    return out


def _epoch(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    out = []
    for s, t, m in loader:
        out.append((s, t, m, loader.last_indices.clone()))
    return out


# ------------------------------------------------------------------------------------------------ resolve_data
def test_resolve_data_kinds_and_errors(tmp_path):
    _folder(tmp_path / "imgs", 2)
    (tmp_path / "list.txt").write_text("imgs/b/000.png\n")
    shards = _shards(tmp_path / "sh", [1, 1, 1])
    assert resolve_data(tmp_path / "imgs").kind == "folder"
    assert resolve_data(str(tmp_path / "list.txt")).kind == "list"
    for spec in (
        f"{tmp_path}/sh/*.tar",
        f"{tmp_path}/sh/shard-{{000..002}}.tar",
        f"{tmp_path}/sh/shard-{{000,001,002}}.tar",
    ):
        src = resolve_data(spec)
        assert src.kind == "shards" and list(src.shards) == [str(s) for s in shards], spec
    assert resolve_data(shards[1]).shards == (str(shards[1]),)
    src = resolve_data(tmp_path / "imgs")
    assert resolve_data(src) is src and isinstance(src, DataSource)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_data(f"{tmp_path}/sh/*.tgz.tar")
    with pytest.raises(FileNotFoundError, match=r"shard-003\.tar"):
        resolve_data(f"{tmp_path}/sh/shard-{{000..003}}.tar")
    with pytest.raises(ValueError, match=r"holds \.tar files: for shards give .*\*\.tar"):
        build_loader(tmp_path / "sh", 1, SMALL, loader="torch", index_dir=tmp_path / "idx")
    with pytest.raises(ValueError, match="bundled sets"):
        resolve_data("samples:cats")
    with pytest.raises(ValueError, match=r"must be \.tar"):
        resolve_data(f"{tmp_path}/*.txt")
    assert expand_braces("a{8..10}b{x,y}") == ["a8bx", "a8by", "a9bx", "a9by", "a10bx", "a10by"]
    assert expand_braces("s{0098..0100}") == ["s0098", "s0099", "s0100"]


# -------------------------------------------------------------------------------------------------- file lists
def test_file_list_labels_missing_and_bad_entries(tmp_path, caplog):
    files = _folder(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG junk")
    lines = [f"{f.relative_to(tmp_path)} {i % 2}" for i, f in enumerate(files)]
    lines += ["# a comment", "", "imgs/missing.png 1", "imgs/broken.png\t0", lines[0]]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    found = scan_list(tmp_path / "list.txt", index_dir=tmp_path / "idx", report_dir=tmp_path / "run")
    assert found.files == [str(f) for f in files], "in list order, each path once"
    assert found.labels == [0, 1, 0, 1] and found.classes == ["0", "1"]
    bad = dict(found.bad)
    assert "No such file" in bad[str(tmp_path / "imgs" / "missing.png")]
    assert (
        "undecodable" in bad[str(tmp_path / "imgs" / "broken.png")]
        or "not an image" in bad[str(tmp_path / "imgs" / "broken.png")]
    )
    assert len((tmp_path / "run" / "bad_files.tsv").read_text().splitlines()) == 3
    (tmp_path / "plain.txt").write_text("".join(f"{f}\n" for f in files[:2]))  # absolute paths, no labels
    found = scan_list(tmp_path / "plain.txt", index_dir=tmp_path / "idx", verbose=False)
    assert found.files == [str(f) for f in files[:2]] and found.labels == [-1, -1] and found.classes == []


@pytest.mark.parametrize("loader", LOADERS)
def test_list_and_folder_give_the_same_batches(tmp_path, loader):
    files = _folder(tmp_path / "imgs", 8)
    (tmp_path / "list.txt").write_text("".join(f"{f}\n" for f in files))
    a = build_loader(tmp_path / "imgs", 4, SMALL, loader=loader, seed=5, num_workers=0, verbose=False)
    b = build_loader(tmp_path / "list.txt", 4, SMALL, loader=loader, seed=5, num_workers=0, verbose=False)
    for x, y in zip(_epoch(a, 1), _epoch(b, 1), strict=True):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------------------ shards
def test_shard_scan_reports_bad_samples_with_shard_and_key(tmp_path, caplog):
    shards = _shards(tmp_path / "sh", [3, 4], bad={1: b"", 4: _png(4, "GIF"), 5: b"\xff\xd8\xff junk"})
    with tarfile.open(tmp_path / "sh" / "shard-002.tar", "w") as tar:  # a sample with no image
        info = tarfile.TarInfo("k.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    (tmp_path / "sh" / "shard-003.tar").write_bytes(b"not a tar at all" * 40)
    found = scan_shards(
        sorted((tmp_path / "sh").glob("*.tar")), index_dir=tmp_path / "idx", report_dir=tmp_path / "run"
    )
    assert isinstance(found, ShardSet) and len(found) == 4
    assert [k for _, k, _, _ in found.samples] == ["dir/s0000", "dir/s0002", "dir/s0003", "dir/s0006"]
    assert found.labels == [0, 0, 1, 0] and found.classes == ["0", "1"]
    bad = dict(found.bad)
    assert bad[f"{shards[0]}:dir/s0001"] == "empty file"
    assert "GIF" in bad[f"{shards[1]}:dir/s0004"]
    assert f"{shards[1]}:dir/s0005" in bad
    assert "no image component" in bad[f"{tmp_path / 'sh' / 'shard-002.tar'}:k"]
    assert "tar" in bad[str(tmp_path / "sh" / "shard-003.tar")]
    listed = (tmp_path / "run" / "bad_files.tsv").read_text()
    assert all(name in listed for name in bad)
    logged = [r.getMessage() for r in caplog.records if r.name == "conmim.data"]
    assert sum("excluding" in line for line in logged) == 5


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_samples_in_shards_are_skipped_and_the_epoch_completes(tmp_path, loader):
    _shards(tmp_path / "sh", [3, 4], bad={1: b"", 4: _png(4, "GIF")})
    L = build_loader(
        f"{tmp_path}/sh/*.tar",
        1,
        SMALL,
        loader=loader,
        num_workers=0,
        verbose=False,
        run_dir=tmp_path / "run",
    )
    seen = sorted(i for *_, idx in _epoch(L) for i in idx.tolist())
    assert seen == list(range(5))
    assert len((tmp_path / "run" / "bad_files.tsv").read_text().splitlines()) == 3


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    ("counts", "world"), [([4, 4, 4, 4], 2), ([5, 2, 7], 2), ([3, 3, 3, 3, 3], 3), ([9], 2)]
)
def test_shards_split_across_ranks_every_sample_once(tmp_path, loader, counts, world):
    """Any number of shards for any world size: ranks split the samples, not the shards, so every sample is
    seen in the epoch (drop_last=False here). torch pads each rank to ceil(n / world) samples by repeating
    (DistributedSampler's rule); DALI cuts the samples into contiguous parts and repeats nothing."""
    _shards(tmp_path / "sh", counts)
    n = sum(counts)
    shares, lengths = [], []
    for rank in range(world):
        L = build_loader(
            f"{tmp_path}/sh/shard-*.tar", 1, SMALL, loader=loader, rank=rank, world_size=world, seed=3,
            num_workers=0, verbose=False, drop_last=False,
        )  # fmt: skip
        shares.append([i for *_, b in _epoch(L, 2) for i in b.tolist()])
        lengths.append(len(L))
    seen = [i for s in shares for i in s]
    assert set(seen) == set(range(n)), "every sample in the epoch"
    assert len(set(lengths)) == 1, "every rank steps the same number of times"
    if loader == "torch":
        assert all(len(s) == -(-n // world) for s in shares)
        assert len(seen) - len(set(seen)) == -(-n // world) * world - n, "only the padding repeats"
    else:
        assert sorted(seen) == list(range(n)), "each sample exactly once"


@pytest.mark.parametrize("loader", LOADERS)
def test_shards_resume_mid_epoch_exactly(tmp_path, loader):
    _shards(tmp_path / "sh", [5, 6])
    spec = f"{tmp_path}/sh/shard-{{000..001}}.tar"
    full = build_loader(spec, 2, SMALL, loader=loader, seed=4, num_workers=0, verbose=False)
    whole = _epoch(full, 3)
    for start in (1, 3):
        resumed = build_loader(spec, 2, SMALL, loader=loader, seed=4, num_workers=0, verbose=False)
        rest = _epoch(resumed, 3, start)
        assert len(rest) == len(whole) - start
        for x, y in zip(rest, whole[start:], strict=True):
            for u, v in zip(x, y):
                assert torch.equal(u, v)


def test_shards_and_folder_give_the_same_batches_on_torch(tmp_path):
    """The torch loader gives sample i the same views whatever holds it: unshuffled shards of a folder's
    files in the folder's order give the folder's batches."""
    files = _folder(tmp_path / "imgs", 9)
    (tmp_path / "sh").mkdir()
    _tar(tmp_path / "sh" / "a.tar", [(f"{i:03d}", {"png": f.read_bytes()}) for i, f in enumerate(files[:4])])
    _tar(
        tmp_path / "sh" / "b.tar", [(f"{i:03d}", {"png": f.read_bytes()}) for i, f in enumerate(files[4:], 4)]
    )
    a = build_loader(tmp_path / "imgs", 3, SMALL, loader="torch", seed=1, num_workers=0, verbose=False)
    b = build_loader(
        f"{tmp_path}/sh/{{a,b}}.tar", 3, SMALL, loader="torch", seed=1, num_workers=0, verbose=False
    )
    for x, y in zip(_epoch(a), _epoch(b), strict=True):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


@needs_dali
def test_dali_and_torch_read_the_same_shard_pixels(tmp_path):
    """Without augmentation randomness that differs between the loaders (full-image crop, no flip, no
    perturbation), DALI's webdataset reader and the torch reader give each sample the same pixels."""
    _shards(tmp_path / "sh", [3, 3], bad={i: _png(i, size=(32, 32)) for i in range(6)})  # no resizing
    views = ViewConfig(image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, perturb=False)
    out = {}
    for loader in ("torch", "dali"):
        L = build_loader(
            f"{tmp_path}/sh/*.tar", 2, views, loader=loader, num_workers=0, verbose=False, shuffle=False
        )
        got = {}
        for s, _, _, idx in _epoch(L):
            got.update({i: s[j] for j, i in enumerate(idx.tolist())})
        out[loader] = got
    assert sorted(out["torch"]) == sorted(out["dali"]) == list(range(6))
    for i in range(6):  # one grey level is 1 / (255 * std) ~ 0.018 in normalised units
        torch.testing.assert_close(out["torch"][i], out["dali"][i], atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------------------ conmim-shards
def test_write_shards_balanced_seeded_and_readable(tmp_path, capsys):
    files = _folder(tmp_path / "imgs", 24)
    (tmp_path / "imgs" / "a" / "bad.png").write_bytes(b"")
    total = sum(f.stat().st_size for f in files)
    rc = shards_main(
        [
            str(tmp_path / "imgs"),
            str(tmp_path / "out"),
            "--shard-size",
            str(total // 4 + 1),
            "--seed",
            "7",
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["samples"] == 24 and index["excluded"] == 1 and index["classes"] == ["a", "b"]
    sizes = [s["bytes"] for s in index["shards"]]
    assert len(sizes) == 4 and max(sizes) - min(sizes) <= max(f.stat().st_size for f in files)
    assert index["pattern"] in printed
    found = scan_shards(resolve_data(index["pattern"]).shards, index_dir=tmp_path / "idx", verbose=False)
    rows = [line.split("\t") for line in (tmp_path / "out" / "samples.tsv").read_text().splitlines()[1:]]
    order = [Path(r[2]) for r in rows]
    assert sorted(order) == files and order != files, "every image once, shuffled"
    reader = found.reader()
    for i, (key, _, src, label) in enumerate(rows):
        assert found.samples[i][1] == key and reader.read(i) == Path(src).read_bytes()
        assert found.labels[i] == int(label) == (0 if Path(src).parent.name == "a" else 1)
    rc = shards_main(
        [
            str(tmp_path / "imgs"),
            str(tmp_path / "out2"),
            "--shard-size",
            str(total // 4 + 1),
            "--seed",
            "7",
            "--quiet",
        ]
    )
    assert rc == 0 and (tmp_path / "out2" / "samples.tsv").read_text().split("\n")[1:] == [
        line.replace("/out/", "/out2/")
        for line in (tmp_path / "out" / "samples.tsv").read_text().split("\n")[1:]
    ], "the same seed, the same shuffle"
    for idx_file in sorted((tmp_path / "out").glob("*.idx")):  # DALI's index format, one line per sample
        lines = idx_file.read_text().splitlines()
        assert lines[0] == f"v1.2 {len(lines) - 1}" and all(
            line.startswith("png ") and " cls " in line for line in lines[1:]
        )
    assert shards_main([str(tmp_path / "imgs"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert shards_main([str(tmp_path / "nope"), str(tmp_path / "out3")]) == 2
    assert not (tmp_path / "out3").exists()


@needs_dali
def test_dali_reads_written_shards_with_their_own_index(tmp_path):
    """The .idx files conmim-shards writes are DALI's format: DALI's reader opens the shards with them."""
    from nvidia.dali import fn, pipeline_def

    _folder(tmp_path / "imgs", 6)
    write_shards(tmp_path / "imgs", tmp_path / "out", shard_bytes=2000, verbose=False)
    tars = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))

    @pipeline_def
    def pipe():
        img, cls = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["png", "cls"], name="R"
        )
        return fn.decoders.image(img, device="cpu"), cls

    p = pipe(batch_size=6, num_threads=1, device_id=None)
    p.build()
    img, cls = p.run()
    assert len(img) == 6 and sorted(int(bytes(np.asarray(cls[i]))) for i in range(6)) == [0, 0, 0, 1, 1, 1]
