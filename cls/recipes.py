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
    "batch_size": (1024, MAE_FT),  # 32 per GPU x 32 GPUs
    "weight_decay": (0.05, MAE_FT),
    "mixup": (0.8, MAE_FT),
    "cutmix": (1.0, MAE_FT),
    "reprob": (0.25, MAE_FT),
    "global_pool": ("avg", MAE_FT),  # FINETUNE.md notes: --global_pool
    "warmup_epochs": (5, MAE_FT_ARGS),
    "label_smoothing": (0.1, MAE_FT_ARGS),
    "randaug": ("rand-m9-mstd0.5-inc1", MAE_FT_ARGS),
    "min_lr": (1e-6, MAE_FT_ARGS),
}

FINETUNE: dict[str, dict[str, tuple]] = {
    # CrossMAE's README gives the ViT-B command and applies it to ViT-S by changing --model
    "small": {**_FT_COMMON, "blr": (5e-4, CROSSMAE_FT), "layer_decay": (0.65, CROSSMAE_FT),
              "drop_path_rate": (0.1, CROSSMAE_FT), "epochs": (100, CROSSMAE_FT),
              "expected": (79.3, CROSSMAE_MODELS)},
    "base": {**_FT_COMMON, "blr": (5e-4, CROSSMAE_FT), "layer_decay": (0.65, CROSSMAE_FT),
             "drop_path_rate": (0.1, CROSSMAE_FT), "epochs": (100, CROSSMAE_FT),
             "expected": (83.7, CROSSMAE_MODELS)},
    "large": {**_FT_COMMON, "blr": (1e-3, MAE_FT_L), "layer_decay": (0.75, MAE_FT_L),
              "drop_path_rate": (0.2, MAE_FT_L), "epochs": (50, MAE_FT_L),
              "expected": (85.4, CROSSMAE_MODELS)},
    "huge": {**_FT_COMMON, "blr": (1e-3, MAE_FT_H), "layer_decay": (0.75, MAE_FT_H),
             "drop_path_rate": (0.3, MAE_FT_H), "epochs": (50, MAE_FT_H),
             "expected": (86.3, PAPER_T1 + ", CrossMAE (25%); 86.4 at 75%")},
}  # fmt: skip

_LP_COMMON = {
    "batch_size": (16384, MAE_LP),  # 512 per GPU x 32 GPUs
    "blr": (0.1, MAE_LP),
    "weight_decay": (0.0, MAE_LP),
    "global_pool": ("token", MAE_LP),  # --cls_token
    "epochs": (90, MAE_LP),  # MAE: 50 suffice for ViT-L / H; the paper's 90 kept
    "warmup_epochs": (10, MAE_LP_ARGS),
}

LINPROBE: dict[str, dict[str, tuple]] = {
    "small": {**_LP_COMMON, "expected": (51.5, PAPER_T12)},
    "base": {**_LP_COMMON, "expected": (65.4, PAPER_T12)},
    "large": {**_LP_COMMON, "expected": (None, PAPER_T12)},  # not reported
    "huge": {**_LP_COMMON, "expected": (None, PAPER_T12)},
}

# the fast probe on cached features (cls frozen) keeps the linear probe's schedule
FROZEN_KEYS = {"probe_epochs": "epochs", "probe_warmup_epochs": "warmup_epochs",
               "probe_batch_size": "batch_size", "probe_weight_decay": "weight_decay"}  # fmt: skip
