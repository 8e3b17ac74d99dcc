"""The two views of ConMIM (see README, "The method"): one random-resized crop and flip shared by both views;
the student view only normalised; the teacher view photometrically perturbed, then normalised.

``ViewConfig`` holds the parameters every loader (DALI, torch) applies the same way; ``two_views`` is the torch
implementation for one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewConfig:
    """Augmentation parameters (defaults: CONMIM's recipe at 224 px)."""

    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    perturb: bool = True  # the teacher view's photometric perturbation
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    mean: tuple[float, ...] | None = None  # per channel, of [0, 1] pixels; None: ImageNet's (3), 0.5 (1)
    std: tuple[float, ...] | None = None  # per channel; None: ImageNet's (3), 0.25 (1)
    channels: int = 3  # 3: RGB; 1: grayscale (every image reduced to one channel, for in_chans = 1)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        for name, default in (("mean", (IMAGENET_MEAN, (0.5,))), ("std", (IMAGENET_STD, (0.25,)))):
            v = getattr(self, name)
            if v is None:
                v = default[0] if self.channels == 3 else default[1]
            try:
                v = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a sequence of {self.channels} numbers, got {v!r}") from None
            if len(v) != self.channels:
                raise ValueError(
                    f"{name} must have one value per channel ({self.channels}), got {len(v)}: {v}"
                )
            if not all(math.isfinite(x) for x in v) or (name == "std" and not all(x > 0 for x in v)):
                raise ValueError(f"{name} must be finite{' and positive' if name == 'std' else ''}, got {v}")
            object.__setattr__(self, name, v)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")


def _normalize(img_u8: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(-1, 1, 1)
    std = torch.tensor(cfg.std).view(-1, 1, 1)
    return (img_u8.float() / 255.0 - mean) / std


def _png_bit_depth(data: bytes) -> int:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 0


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    """16-bit samples to 8 bits as DALI's decoder does, round(x / 257) (Pillow's own conversion clips them)."""
    return ((x.to(torch.int64).clamp(0, 65535) * 255 + 32767) // 65535).to(torch.uint8)


def _channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [c, H, W] with c in 1..4 (gray, gray+alpha, RGB, RGBA) to ``channels`` (1 or 3); alpha dropped."""
    from torchvision.transforms.v2 import functional as F

    c = img.shape[0]
    color = img[:3] if c >= 3 else img[:1]
    if channels == 3:
        return color if color.shape[0] == 3 else color.expand(3, -1, -1).contiguous()
    return color if color.shape[0] == 1 else F.rgb_to_grayscale(color)


def decode_image(data: bytes, channels: int = 3) -> torch.Tensor:
    """uint8 [channels, H, W] (``channels`` 3: RGB, 1: gray) from the bytes of a JPEG, PNG, TIFF, BMP or WebP,
    with the pixels DALI's decoder gives (within one level of rounding): grayscale, CMYK, palette and alpha
    images made RGB, 16-bit PNG and TIFF scaled by 257 rather than clipped."""
    import io
    import warnings

    import numpy as np
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if _png_bit_depth(data) == 16:  # Pillow reads 16-bit colour PNGs only as 8 bits truncated: decode exactly
        from torchvision.io import ImageReadMode, decode_png

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoders still ship and work
            raw = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
        return _channels(_to_u8(raw), channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grayscale (I;16, I;16B, I, F)
                arr = np.asarray(im).astype(np.float64 if im.mode == "F" else np.int64)
                gray = _to_u8(torch.from_numpy(np.rint(arr) if im.mode == "F" else arr))[None]
                return _channels(gray, channels)
            return _pil_to_tensor(im.convert("RGB" if channels == 3 else "L"))


def _pil_to_tensor(im) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.pil_to_tensor(im)


def load_image(path, channels: int = 3) -> torch.Tensor:
    """:func:`decode_image` of a file."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), channels)


def load_rgb(path) -> torch.Tensor:
    """uint8 [3, H, W] from any image file the scan accepts (see :func:`decode_image`)."""
    return load_image(path, 3)


def two_views(img: torch.Tensor, cfg: ViewConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student view, teacher view), each float32 [C, S, S] normalised, from a uint8 [C, H, W] image; all random
    draws come from ``seed`` (same seed, same views, whatever the worker)."""
    from torchvision.transforms import InterpolationMode, v2
    from torchvision.transforms.v2 import functional as F

    size = [cfg.image_size, cfg.image_size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = v2.RandomResizedCrop.get_params(img, list(cfg.scale), list(cfg.ratio))
        base = F.resized_crop(
            img, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        if torch.rand(()) < cfg.flip_p:
            base = F.horizontal_flip(base)
        teacher = base
        if cfg.perturb:
            if torch.rand(()) < cfg.jitter_p:
                b, c, s, hue = cfg.jitter
                teacher = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=hue)(teacher)
            if torch.rand(()) < cfg.gray_p and cfg.channels == 3:
                teacher = F.rgb_to_grayscale(teacher, num_output_channels=3)
            if torch.rand(()) < cfg.blur_p:
                sigma = float(torch.empty(()).uniform_(*cfg.blur_sigma))
                k = 2 * math.ceil(3 * sigma) + 1
                teacher = F.gaussian_blur(teacher, [k, k], [sigma, sigma])
            if torch.rand(()) < cfg.solarize_p:
                teacher = F.solarize(teacher, 128)
    return _normalize(base, cfg), _normalize(teacher, cfg)
