"""conmim-finetune's configuration: a frozen dataclass whose fields carry default, help, allowed values and range
(:func:`conmim.config.option`), presets as YAML overlays in ``conmim/configs/finetune/``, argparse generated from
the fields (:func:`conmim.config.parser`) and one validation (:func:`conmim.config.resolve`).

The defaults are the official recipe, so no ``--config`` means the ``official`` preset.
"""

import dataclasses
from dataclasses import dataclass

from conmim.config import ConfigError, above, at_least, option, within
from conmim.parallel import DEVICES, STRATEGIES

PRECISIONS = ("bf16", "fp16", "fp32")
positive = above(0)
non_negative = at_least(0)
at_least_one = at_least(1)
unit = within(0, 1)
fraction = within(0, 1, (False, True))


@dataclass(frozen=True)
class FinetuneConfig:
    """A resolved, validated conmim-finetune configuration. Defaults are the official ConMIM/BEiT recipe
    (``run_class_finetuning.py`` with the ViT-B command of the official README)."""

    PRESET_DIR = "configs/finetune"  # presets: conmim/configs/finetune/<name>.yaml

    # what to fine-tune, on what
    init: str | None = option(
        None,
        "initialisation: a conmim-train run folder (its newest checkpoint), an exported .safetensors file "
        "(with its .json sidecar), or none (random initialisation: the from-scratch baseline)",
    )
    which: str = option(
        "teacher",
        "network of a run folder to start from (ConMIM fine-tunes the teacher)",
        ("teacher", "student"),
    )
    data: str | None = option(
        None, "labelled folder with train/<class>/ and val/<class>/, or samples:mnist (bundled digits)"
    )
    out: str | None = option(None, "run folder (config, metrics, checkpoints, results); required")
    train_fraction: float = option(
        1.0,
        "fraction of each class's training images used (low-label runs; chosen with seed)",
        check=fraction,
    )
    model: str | None = option(
        None, "network (a conmim.models.MODELS key); default: the one the init was pretrained with"
    )
    image_size: int | None = option(None, "input side in pixels; default: the init's", check=at_least_one)
    patch_size: int | None = option(None, "patch side in pixels; default: the init's", check=at_least_one)
    baseline: bool = option(
        False, "also fine-tune the same network from random initialisation (in OUT/scratch) and report both"
    )
    # network
    drop_path: float = option(0.1, "stochastic depth rate of the last block (linear from 0)", check=unit)
    init_scale: float = option(0.001, "the new head's initial weights are scaled by this", check=non_negative)
    # optimisation
    epochs: int = option(100, "training epochs", check=at_least_one)
    warmup_epochs: float = option(20, "linear warm-up from 0 over this many epochs", check=non_negative)
    batch_size: int = option(128, "images per rank per micro-batch (even: mixup pairs a batch with its flip)",
                             check=at_least_one)  # fmt: skip
    accum_steps: int = option(
        1, "micro-batches per optimizer step (gradient accumulation)", check=at_least_one
    )
    lr: float = option(
        4e-3, "peak learning rate at a global batch of lr_batch (linear scaling)", check=positive
    )
    lr_batch: int = option(1024, "global batch at which lr applies: peak = lr * global batch / lr_batch",
                           check=at_least_one)  # fmt: skip
    min_lr: float = option(1e-6, "learning rate at the end of the cosine", check=non_negative)
    layer_decay: float = option(0.65, "layer-wise learning-rate decay (1: none)", check=fraction)
    weight_decay: float = option(0.05, "AdamW weight decay (not on 1-D params, tokens, position tables)",
                                 check=non_negative)  # fmt: skip
    beta1: float = option(0.9, "AdamW beta1", check=within(0, 1, (True, False)))
    beta2: float = option(0.999, "AdamW beta2", check=within(0, 1, (True, False)))
    clip_grad: float = option(0.0, "gradient-norm clipping (0: off)", check=non_negative)
    # augmentation and loss
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "timm RandAugment policy (none: off)")
    crop_scale_min: float = option(0.08, "random-resized-crop smallest area fraction", check=fraction)
    hflip: float = option(0.5, "horizontal flip probability", check=unit)
    reprob: float = option(0.25, "random erasing probability", check=unit)
    mixup: float = option(0.8, "mixup alpha (0: off)", check=non_negative)
    cutmix: float = option(1.0, "cutmix alpha (0: off)", check=non_negative)
    mixup_prob: float = option(1.0, "probability of mixup or cutmix per batch", check=unit)
    mixup_switch_prob: float = option(
        0.5, "probability of cutmix rather than mixup when both are on", check=unit
    )
    smoothing: float = option(0.1, "label smoothing", check=unit)
    eval_crop_pct: float = option(
        0.875, "validation: resize to image_size / crop_pct, centre crop", check=fraction
    )
    # machinery
    seed: int = option(0, "seed of the labelled subset, the head, the data order, augmentations and mixup")
    device: str = option("auto", "auto: cuda when available", DEVICES)
    precision: str = option(
        "bf16",
        "autocast dtype (fp32: none; fp16 with a dynamic loss scale, torch.amp.GradScaler, as the official fp16)",
        PRECISIONS,
    )
    strategy: str = option(
        "ddp",
        "ddp: the whole network on every rank (DDP under torchrun); fsdp: FSDP2, every block sharded over the "
        "ranks (conmim.parallel's strategies, as conmim-train's; checkpoints resume under either)",
        tuple(STRATEGIES),
    )
    grad_checkpointing: bool = option(False, "recompute block activations in backward (less memory)")
    loader: str = option(
        "torch",
        "training images: torch (timm's transforms in DataLoader workers: the official augmentation exactly) or "
        "dali (NVIDIA DALI: decoding on the GPU, DALI's RandAugment without timm's magnitude noise); validation "
        "always reads through torch",
        ("torch", "dali"),
    )
    num_workers: int = option(
        8, "data-loading worker processes per rank (DALI: its CPU threads, at least 1)", check=non_negative
    )
    eval_every: int = option(
        1, "epochs between validations (the last epoch is always validated)", check=at_least_one
    )
    eval_batch_size: int = option(192, "validation images per forward pass", check=at_least_one)
    log_every: int = option(20, "optimizer steps between metrics records", check=at_least_one)
    checkpoint_every: int = option(0, "also checkpoint every this many optimizer steps (0: epoch ends only)",
                                   check=non_negative)  # fmt: skip
    keep_last: int = option(2, "checkpoints kept", check=at_least_one)
    progress: bool = option(True, "progress bar on stderr")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __post_init__(self):
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs {self.warmup_epochs} must not exceed epochs {self.epochs}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr {self.min_lr} must not exceed lr {self.lr}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(
                f"batch_size must be even with mixup/cutmix (each batch is mixed with its flip), got {self.batch_size}"
            )


__all__ = ["ConfigError", "FinetuneConfig"]
