"""Fine-tuning a ConMIM-pretrained backbone as a classifier (``conmim-finetune``): the official recipe from
timm's parts (:mod:`conmim.finetune.recipe`), labelled data (:mod:`conmim.finetune.data`), the configuration
(:mod:`conmim.finetune.config`) and the loop with its run folder (:mod:`conmim.finetune.run`)."""

from conmim.finetune.config import FinetuneConfig
from conmim.finetune.run import main, train

__all__ = ["FinetuneConfig", "main", "train"]
