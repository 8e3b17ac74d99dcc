"""conmim-eval knn|linear RUN_DIR_OR_FILE --data FOLDER: k-NN and linear-probe top-1 on frozen features.

FOLDER holds train/ and val/ with one sub-folder per class (samples:mnist uses the bundled digits). Features: the
mean of the backbone's patch tokens after the final norm, L2-normalised. k-NN: cosine similarity, k = 20 nearest
training images, votes weighted by exp(similarity / 0.07). Linear probe: a linear classifier trained with AdamW on
the frozen features. Every result is printed beside the same network's at random initialisation (the baseline).

``knn_monitor(model)`` is the same k-NN on a fixed subset, cheap enough to run during training.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from torch import nn

from conmim import config as cfgmod
from conmim._fs import write_atomic
from conmim.data import ImageFolder, samples, scan_folder
from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD, load_rgb

BUNDLED = "samples:mnist"


def _resolve_folder(spec) -> Path:
    """A folder with train/ and val/, or the bundled digits (built on first use)."""
    if str(spec) == BUNDLED:
        return samples.build(samples.default_dest(), photos=False)["mnist_train"].parent
    return Path(spec).expanduser()


def labelled_split(data) -> tuple[ImageFolder, ImageFolder]:
    """The scanned train/ and val/ folders of ``data`` (a path or ``samples:mnist``), with the same classes."""
    folder = _resolve_folder(data)
    train_dir, val_dir = folder / "train", folder / "val"
    if not (train_dir.is_dir() and val_dir.is_dir()):
        raise FileNotFoundError(
            f"data folder {str(folder)!r} must hold train/ and val/ with one folder per class"
        )
    tr = scan_folder(train_dir, verbose=False)
    va = scan_folder(val_dir, verbose=False)
    if tr.classes != va.classes or not tr.classes:
        raise ValueError(
            f"train/ and val/ must hold the same class folders, got {tr.classes} and {va.classes}"
        )
    return tr, va


def load_backbone(
    source: str, random_init: bool = False, which: str = "teacher", init_seed: int = 0
) -> tuple[nn.Module, int]:
    """(timm backbone, image size) from a run folder (``which`` network of its newest checkpoint) or an
    exported file; ``random_init`` keeps the architecture and skips the weights (initialised from ``init_seed``)."""
    import timm

    from conmim.export import backbone_state

    src = Path(source)
    if src.is_dir():
        from conmim.export import read_run
        from conmim.models import model_spec

        cfg, state = read_run(src) if not random_init else (cfgmod.read_file(src / "config.yaml"), None)
        name, kwargs = model_spec(cfg["model"])
        kwargs.update(img_size=cfg["image_size"], patch_size=cfg["patch_size"])
        weights = backbone_state(state[which]) if state is not None else None
    elif src.is_file():
        meta = json.loads(Path(str(src) + ".json").read_text())
        name, kwargs = meta["timm_model"], meta["kwargs"]
        from safetensors.torch import load_file

        weights = None if random_init else load_file(str(src))
    else:
        raise FileNotFoundError(f"{source!r} is neither a run folder nor an exported file")
    torch.manual_seed(init_seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights is not None:
        model.load_state_dict(weights)
    return model.eval(), kwargs.get("img_size", 224)


def load_images(files: list[str], image_size: int) -> torch.Tensor:
    """uint8 [n, 3, S, S]: each image resized (shorter side S, bicubic) and centre-cropped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, f in enumerate(files):
        img = F.resize(load_rgb(f), [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        out[i] = F.center_crop(img, [image_size, image_size])
    return out


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised features [n, D] on the CPU of a timm ViT in its current mode: the mean of the patch tokens
    after the final norm (ConMIM trains patch tokens; its CLS token gets no direct signal), from uint8 images
    with ImageNet normalisation. Runs on the model's device and dtype."""
    p = next(model.parameters())
    mean = torch.tensor(IMAGENET_MEAN, device=p.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=p.device).view(1, 3, 1, 1)
    prefix = getattr(model, "num_prefix_tokens", 1)
    out = []
    for i in range(0, len(images), batch):
        x = (images[i : i + batch].to(p.device).float() / 255 - mean) / std
        tokens = model.forward_features(x.to(p.dtype))
        out.append(nn.functional.normalize(tokens[:, prefix:].float().mean(1), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, getattr(model, "embed_dim", 0))


def features(model: nn.Module, files: list[str], image_size: int, batch: int = 256) -> torch.Tensor:
    """:func:`embed` of the images in ``files`` (resize + centre crop)."""
    return embed(model, load_images(files, image_size), batch)


def knn_top1(train_f, train_y, val_f, val_y, k: int = 20, temperature: float = 0.07) -> float:
    n_cls = int(train_y.max()) + 1
    sims = val_f @ train_f.T
    top, idx = sims.topk(min(k, train_f.shape[0]), dim=1)
    votes = torch.zeros(val_f.shape[0], n_cls).scatter_add_(1, train_y[idx], (top / temperature).exp())
    return (votes.argmax(1) == val_y).float().mean().item()


def linear_top1(train_f, train_y, val_f, val_y, epochs: int = 300, lr: float = 1e-2) -> float:
    torch.manual_seed(0)
    clf = nn.Linear(train_f.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    xt, xv = (train_f - mu) / sd, (val_f - mu) / sd
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(clf(xt), train_y).backward()
        opt.step()
    return (clf(xv).argmax(1) == val_y).float().mean().item()


def evaluate(
    mode: str, source: str, data: str, random_init: bool = False, which: str = "teacher", init_seed: int = 0
) -> float:
    tr, va = labelled_split(data)
    model, size = load_backbone(source, random_init, which, init_seed)
    ftr, fva = features(model, tr.files, size), features(model, va.files, size)
    ytr, yva = torch.tensor(tr.labels), torch.tensor(va.labels)
    return knn_top1(ftr, ytr, fva, yva) if mode == "knn" else linear_top1(ftr, ytr, fva, yva)


# ------------------------------------------------------------------------------------------- online monitor
def _evenly(n: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over range(n) (all of them when limit is None or >= n): over files sorted
    by class, every class keeps its share."""
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


@functools.lru_cache(maxsize=4)
def _monitor_set(data: str, image_size: int, max_train: int | None, max_val: int | None):
    """(train images, train labels, val images, val labels): decoded once per process, kept as uint8."""
    tr, va = labelled_split(data)
    sets = []
    for folder, limit in ((tr, max_train), (va, max_val)):
        keep = _evenly(len(folder), limit)
        sets += [load_images([folder.files[i] for i in keep], image_size), torch.tensor(folder.labels)[keep]]
    return tuple(sets)


def _backbone(model: nn.Module) -> nn.Module:
    """The timm ViT inside a MomentumTeacher, a ConMIMEncoder, DDP or torch.compile wrappers."""
    from conmim.models import ConMIMEncoder
    from conmim.teacher import _unwrap

    model = _unwrap(getattr(model, "module", model))
    return model.backbone if isinstance(model, ConMIMEncoder) else model


def knn_monitor(
    model: nn.Module,
    data: str = BUNDLED,
    image_size: int | None = None,
    max_train: int | None = 2000,
    max_val: int | None = 500,
    k: int = 20,
    temperature: float = 0.07,
    batch: int = 256,
) -> float:
    """k-NN top-1 (a fraction in [0, 1]) of ``model``'s frozen features on a labelled folder, for logging during
    training: the k-NN of ``conmim-eval knn`` on a fixed subset, so it is cheap enough to run every few epochs.

    Args:
        model: a ``MomentumTeacher``, a ``ConMIMEncoder`` or a timm ViT (DDP / torch.compile wrappers are
            unwrapped); its backbone runs in eval mode on its own device under ``no_grad`` and its mode is
            restored afterwards. Call it on one rank: it does no collective.
        data: a folder with ``train/`` and ``val/`` (one sub-folder per class), or ``samples:mnist``.
        image_size: input side; default the backbone's (``patch_embed.img_size``).
        max_train, max_val: images used from each split, spread evenly over the classes (None: all). The
            images are decoded once per process and kept in memory as uint8 (2,500 at 32 px: 7.7 MB).
        k, temperature: neighbours and the vote weighting exp(similarity / temperature).
        batch: images per forward pass.
    """
    backbone = _backbone(model)
    size = int(image_size or backbone.patch_embed.img_size[0])
    xtr, ytr, xva, yva = _monitor_set(str(data), size, max_train, max_val)
    was_training = backbone.training
    backbone.eval()
    try:
        ftr, fva = embed(backbone, xtr, batch), embed(backbone, xva, batch)
    finally:
        backbone.train(was_training)
    return knn_top1(ftr, ytr, fva, yva, k, temperature)


# ---------------------------------------------------------------------------------------------------- the CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conmim-eval",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=("knn", "linear"), help="knn: k-NN classifier; linear: linear probe")
    p.add_argument(
        "source",
        help="a run folder (its newest loadable checkpoint) or a .safetensors file from conmim-export",
    )
    p.add_argument(
        "--data",
        required=True,
        help="labelled folder with train/ and val/, one sub-folder per class, or samples:mnist (bundled digits)",
    )
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network of a run folder to evaluate (default: teacher, the one ConMIM fine-tunes)",
    )
    p.add_argument(
        "--compare-random",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the same architecture at random initialisation, the baseline printed beside the "
        "result (default: on)",
    )
    p.add_argument(
        "--json",
        help="write the results here (default: eval_<mode>_<which>.json in the run folder, or "
        "eval_<mode>.json beside an exported file)",
    )
    return p


def _results_path(args) -> Path:
    """Where the results go; checked before any work, so a bad path loses nothing."""
    src = Path(args.source)
    name = f"eval_{args.mode}_{args.which}.json" if src.is_dir() else f"eval_{args.mode}.json"
    out = Path(args.json) if args.json else (src if src.is_dir() else src.parent) / name
    if out.is_dir():
        raise ValueError(f"--json {str(out)!r} is a folder: name the file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--json {str(out)!r}: folder {str(out.parent)!r} does not exist")
    return out


def main(argv=None) -> int:
    from safetensors import SafetensorError

    from conmim.checkpoint import CheckpointError

    args = parser().parse_args(argv)
    try:
        out = _results_path(args)
        result = {
            "mode": args.mode,
            "source": args.source,
            "data": args.data,
            "which": args.which,
            "top1": evaluate(args.mode, args.source, args.data, which=args.which),
        }
        if args.compare_random:
            result["top1_random_init"] = evaluate(args.mode, args.source, args.data, random_init=True)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError, SafetensorError) as exc:
        print(f"conmim-eval: error: {exc}", file=sys.stderr)
        return 2
    write_atomic(out, json.dumps(result, indent=1))
    what = "k-NN" if args.mode == "knn" else "linear-probe"
    line = f"{what} top-1 of the {args.which}: {100 * result['top1']:.2f}%"
    if "top1_random_init" in result:
        gain = 100 * (result["top1"] - result["top1_random_init"])
        line += f" (random initialisation: {100 * result['top1_random_init']:.2f}%, {gain:+.2f} points)"
    print(line)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
