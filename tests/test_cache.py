"""Shared files under concurrent starts: the bundled samples and the scan index, built by two processes at once."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conmim._fs import write_atomic
from conmim.data import samples, scan_folder

ROUNDS = 3

# One rank: per round, wait for the other at a file barrier, then build the samples and scan them (cold cache),
# meet again and do it once more (warm cache). Prints one JSON line per start.
_RANK = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from conmim.data import samples, scan_folder

    base, rank, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    def barrier(name):
        (base / f"{name}-{rank}").touch()
        deadline = time.monotonic() + 120
        while not all((base / f"{name}-{r}").exists() for r in (0, 1)):
            if time.monotonic() > deadline:
                sys.exit(f"rank {rank}: the other rank never reached {name}")
            time.sleep(0.0005)

    for i in range(rounds):
        for phase in ("cold", "warm"):
            barrier(f"{phase}{i}")
            built = samples.build(base / f"cache{i}" / "samples", photos=True, mnist=False)
            folder = scan_folder(built["photos"], index_dir=base / f"cache{i}" / "index")
            print(json.dumps({"round": i, "phase": phase, "photos": str(built["photos"]), "files": folder.files}))
    """
)


@pytest.mark.slow
def test_two_ranks_start_at_once_on_cold_and_warm_caches(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(tmp_path), str(rank), str(ROUNDS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err}"
    runs = [[json.loads(line) for line in out.splitlines()] for out, _ in outs]
    assert runs[0] == runs[1] and len(runs[0]) == 2 * ROUNDS, "both ranks see the same files at every start"
    sources = samples._photo_sources()
    for i in range(ROUNDS):
        cache = tmp_path / f"cache{i}"
        dest = cache / "samples"
        assert sorted(p.name for p in dest.iterdir()) == sorted(["photos", samples._MARK, samples._LOCK]), (
            "no temporary folder or file is left behind"
        )
        assert json.loads((dest / samples._MARK).read_text()) == {"photos": samples.VERSION}
        copied = sorted((dest / "photos").iterdir())
        assert [p.name for p in copied] == sorted(s.name for s in sources)
        assert all(
            p.stat().st_size == s.stat().st_size
            for p, s in zip(copied, sorted(sources, key=lambda s: s.name))
        )
        index = [p for p in (cache / "index").iterdir() if not p.name.endswith(".lock")]
        assert len(index) == 1 and index[0].suffix == ".json", index
        assert len(json.loads(index[0].read_text())["files"]) == len(sources)
        assert all(len(r["files"]) == len(sources) for r in runs[0] if r["round"] == i)


@pytest.mark.parametrize("marker", ["", '{"photos": ', "[1, 2]"])
def test_unreadable_marker_rebuilds(tmp_path, marker):
    """A marker cut short (as an old version's in-place write could leave it) means: build again."""
    dest = tmp_path / "samples"
    dest.mkdir()
    (dest / samples._MARK).write_text(marker)
    built = samples.build(dest, photos=True, mnist=False)
    assert json.loads((dest / samples._MARK).read_text()) == {"photos": samples.VERSION}
    assert len(scan_folder(built["photos"], index_dir=tmp_path / "idx")) == len(samples._photo_sources())


@pytest.mark.parametrize("data", ["text\n", b"\x00\x01bytes"])
def test_write_atomic_replaces_with_ordinary_permissions(tmp_path, data):
    old = os.umask(0o022)
    try:
        target = tmp_path / "f.bin"
        target.write_text("previous content, longer than the new one")
        write_atomic(target, data)
    finally:
        os.umask(old)
    assert target.read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_killed_build_leaves_nothing_behind_the_next_one(tmp_path):
    dest = tmp_path / "samples"
    stale = dest / ".photos.999.0123456789ab"  # what a build killed before its rename leaves
    stale.mkdir(parents=True)
    (stale / "half.png").write_bytes(b"")
    samples.build(dest, photos=True, mnist=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(["photos", samples._MARK, samples._LOCK])


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_a_rank_that_waited_for_the_lock_takes_the_fresh_result(tmp_path, monkeypatch, kind):
    """The ranks of a run start together: the first to hold the index lock scans, the others find an index
    written while they waited and take it as it is (no walk, no read of any image) instead of each rescanning."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from conmim.data import scan as scanmod
    from conmim.data import scan_source

    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 50, np.uint8)).save(root / "a" / f"{i}.png")
    (root / "a" / "bad.png").write_bytes(b"")
    spec = root
    if kind == "shards":
        with tarfile.open(tmp_path / "s.tar", "w") as tar:
            for p in sorted((root / "a").iterdir()):
                info = tarfile.TarInfo(f"{p.stem}.png")
                info.size = p.stat().st_size
                tar.addfile(info, io.BytesIO(p.read_bytes()))
        spec = str(tmp_path / "s.tar")
    first = scan_source(spec, index_dir=tmp_path / "idx", verbose=False)
    real_time = scanmod.time.time
    monkeypatch.setattr(scanmod.time, "time", lambda: real_time() - 3600)  # "started waiting an hour ago"

    def no(*a, **k):
        raise AssertionError("the fresh index should have been taken as it is")

    monkeypatch.setattr(scanmod, "walk_images", no)
    monkeypatch.setattr(scanmod, "run_checks", no)
    again = scan_source(spec, index_dir=tmp_path / "idx", verbose=False)
    assert (again.files, again.bad, again.labels) == (first.files, first.bad, first.labels)
    assert len(again.bad) == 1 and len(again) == 3
    monkeypatch.setattr(scanmod.time, "time", real_time)
    with pytest.raises(AssertionError, match="taken as it is"):  # an older index is checked again
        scan_source(spec, index_dir=tmp_path / "idx", verbose=False)
