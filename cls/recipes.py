"""The ImageNet-1k classification recipes the shipped configs follow: one row per model size,
every value with its source. ``tests/test_cls.py`` checks each ``configs/cls/*_vit_*.yaml``
against this table (its values, and that its header names each value's source and the expected
result), so an edit cannot drift silently; ``docs/classification.md`` prints the same table.

Sources (facebookresearch/mae @ efb2a80, TonyLianLong/CrossMAE @ ed0677a, the CrossMAE paper):
"""

from __future__ import annotations

MAE_FT = "MAE FINETUNE.md, Fine-tuning"
MAE_FT_L = "MAE FINETUNE.md, Script for ViT-Large"
MAE_FT_H = "MAE FINETUNE.md, Script for ViT-Huge"
MAE_FT_ARGS = "MAE main_finetune.py, get_args_parser"
MAE_LP = "MAE FINETUNE.md, Linear Probing"
MAE_LP_ARGS = "MAE main_linprobe.py, get_args_parser"
CROSSMAE_FT = "CrossMAE README.md, Fine-tuning CrossMAE"
CROSSMAE_MODELS = "CrossMAE README.md, Models"
PAPER_T1 = "CrossMAE paper, Table 1"
PAPER_T12 = "CrossMAE paper, Table 12"

# every finetuning recipe: MAE's shared flags and main_finetune.py's defaults
_FT_COMMON = {
    "train.batch_size": (1024, MAE_FT),  # 32 per GPU x 32 GPUs
    "optim.weight_decay": (0.05, MAE_FT),
    "data.mixup": (0.8, MAE_FT),
    "data.cutmix": (1.0, MAE_FT),
    "data.reprob": (0.25, MAE_FT),
    "model.global_pool": ("avg", MAE_FT),  # FINETUNE.md notes: --global_pool
    "optim.warmup_epochs": (5, MAE_FT_ARGS),
    "data.label_smoothing": (0.1, MAE_FT_ARGS),
    "data.randaug": ("rand-m9-mstd0.5-inc1", MAE_FT_ARGS),
    "optim.min_lr": (1e-6, MAE_FT_ARGS),
}

FINETUNE: dict[str, dict[str, tuple]] = {
    # CrossMAE's README gives the ViT-B command and applies it to ViT-S by changing --model
    "small": {**_FT_COMMON, "optim.blr": (5e-4, CROSSMAE_FT),
              "optim.layer_decay": (0.65, CROSSMAE_FT),
              "model.drop_path_rate": (0.1, CROSSMAE_FT), "train.epochs": (100, CROSSMAE_FT),
              "expected": (79.3, CROSSMAE_MODELS)},
    "base": {**_FT_COMMON, "optim.blr": (5e-4, CROSSMAE_FT),
             "optim.layer_decay": (0.65, CROSSMAE_FT),
             "model.drop_path_rate": (0.1, CROSSMAE_FT), "train.epochs": (100, CROSSMAE_FT),
             "expected": (83.7, CROSSMAE_MODELS)},
    "large": {**_FT_COMMON, "optim.blr": (1e-3, MAE_FT_L), "optim.layer_decay": (0.75, MAE_FT_L),
              "model.drop_path_rate": (0.2, MAE_FT_L), "train.epochs": (50, MAE_FT_L),
              "expected": (85.4, CROSSMAE_MODELS)},
    "huge": {**_FT_COMMON, "optim.blr": (1e-3, MAE_FT_H), "optim.layer_decay": (0.75, MAE_FT_H),
             "model.drop_path_rate": (0.3, MAE_FT_H), "train.epochs": (50, MAE_FT_H),
             "expected": (86.3, PAPER_T1 + ", CrossMAE (25%); 86.4 at 75%")},
}  # fmt: skip

_LP_COMMON = {
    "train.batch_size": (16384, MAE_LP),  # 512 per GPU x 32 GPUs
    "optim.blr": (0.1, MAE_LP),
    "optim.weight_decay": (0.0, MAE_LP),
    "model.global_pool": ("token", MAE_LP),  # --cls_token
    "train.epochs": (90, MAE_LP),  # MAE: 50 suffice for ViT-L / H; the paper's 90 kept
    "optim.warmup_epochs": (10, MAE_LP_ARGS),
}

LINPROBE: dict[str, dict[str, tuple]] = {
    "small": {**_LP_COMMON, "expected": (51.5, PAPER_T12)},
    "base": {**_LP_COMMON, "expected": (65.4, PAPER_T12)},
    "large": {**_LP_COMMON, "expected": (None, PAPER_T12)},  # not reported
    "huge": {**_LP_COMMON, "expected": (None, PAPER_T12)},
}

# the fast probe on cached features (cls frozen) keeps the linear probe's schedule
FROZEN_KEYS = {
    "probe.epochs": "train.epochs",
    "probe.warmup_epochs": "optim.warmup_epochs",
    "probe.batch_size": "train.batch_size",
    "probe.weight_decay": "optim.weight_decay",
}
