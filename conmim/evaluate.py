"""conmim-eval knn|linear RUN_DIR_OR_FILE --data FOLDER: k-NN and linear-probe top-1 on frozen features.

FOLDER holds ``train/`` and ``val/`` with one sub-folder per class (``samples:mnist`` uses the bundled digits).
Features: the mean of the backbone's patch tokens after the final norm, L2-normalised. k-NN: cosine similarity, k = 20 nearest
training images, votes weighted by exp(similarity / 0.07). Linear probe: a linear classifier trained with AdamW on
the frozen features. ``--compare-random`` also evaluates the same network at random initialisation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from conmim.data import scan_folder
from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD, load_rgb


def _resolve_folder(spec: str) -> Path:
    if spec == "samples:mnist":
        from conmim.train import resolve_data

        return resolve_data(spec).parent
    return Path(spec).expanduser()


def load_backbone(
    source: str, random_init: bool = False, which: str = "teacher", init_seed: int = 0
) -> tuple[nn.Module, int]:
    """(timm backbone, image size) from a run folder (``which`` network of its newest checkpoint) or an
    exported file; ``random_init`` keeps the architecture and skips the weights (initialised from ``init_seed``)."""
    import timm

    from conmim.export import backbone_state

    src = Path(source)
    if src.is_dir():
        from conmim import config as cfgmod
        from conmim import fsdp
        from conmim.models import model_spec
        from conmim.train import load_latest

        cfg = cfgmod._read_yaml((src / "config.yaml").read_text(), str(src / "config.yaml"))
        name, kwargs = model_spec(cfg["model"])
        kwargs.update(img_size=cfg["image_size"], patch_size=cfg["patch_size"])
        quiet = lambda m: None
        state = None if random_init else fsdp.load_latest_state_dict(src, quiet) or load_latest(src, quiet)
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


@torch.no_grad()
def features(model: nn.Module, files: list[str], image_size: int, batch: int = 256) -> torch.Tensor:
    """L2-normalised features [n, D]: the mean of the patch tokens after the final norm (ConMIM trains patch
    tokens; its CLS token gets no direct signal). Resize + centre crop + ImageNet normalisation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(files), batch):
        imgs = []
        for f in files[i : i + batch]:
            img = F.resize(load_rgb(f), [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            imgs.append(F.center_crop(img, [image_size, image_size]))
        x = (torch.stack(imgs).float() / 255 - mean) / std
        tokens = model.forward_features(x)
        prefix = getattr(model, "num_prefix_tokens", 1)
        out.append(nn.functional.normalize(tokens[:, prefix:].mean(1), dim=-1))
    return torch.cat(out)


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
    model, size = load_backbone(source, random_init, which, init_seed)
    ftr, fva = features(model, tr.files, size), features(model, va.files, size)
    ytr, yva = torch.tensor(tr.labels), torch.tensor(va.labels)
    return knn_top1(ftr, ytr, fva, yva) if mode == "knn" else linear_top1(ftr, ytr, fva, yva)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="conmim-eval", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("knn", "linear"))
    p.add_argument("source", help="run folder or exported .safetensors file")
    p.add_argument("--data", required=True, help="folder with train/ and val/, or samples:mnist")
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network of a run folder to evaluate (ConMIM fine-tunes the teacher)",
    )
    p.add_argument("--compare-random", action="store_true", help="also evaluate the network at random init")
    p.add_argument("--json", help="write the results here (default: <run folder>/eval_<mode>.json)")
    args = p.parse_args(argv)
    try:
        result = {
            "mode": args.mode,
            "source": args.source,
            "data": args.data,
            "which": args.which,
            "top1": evaluate(args.mode, args.source, args.data, which=args.which),
        }
        if args.compare_random:
            result["top1_random_init"] = evaluate(args.mode, args.source, args.data, random_init=True)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"conmim-eval: error: {exc}", file=sys.stderr)
        return 2
    line = f"{args.mode} top-1: {100 * result['top1']:.2f}%"
    if "top1_random_init" in result:
        line += f" (random init: {100 * result['top1_random_init']:.2f}%)"
    print(line)
    src = Path(args.source)
    name = f"eval_{args.mode}_{args.which}.json" if src.is_dir() else f"eval_{args.mode}.json"
    out = Path(args.json) if args.json else (src if src.is_dir() else src.parent) / name
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
