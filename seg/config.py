"""Typed config of UperNet training (defaults: the MAE / BEiT ViT-B ADE20K 160k recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import EncoderSource


@dataclass
class SegConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    root: str = "???"  # images/<split>/ and annotations/<split>/
    dataset: str = "ade20k"  # ade20k | camvid | custom
    num_classes: int = 150  # custom only (ade20k: 150, camvid: 11)
    ignore_value: int | None = None  # custom only: raw label value of unlabelled pixels
    reduce_zero_label: bool = False  # custom only
    train_split: str = "training"
    val_split: str = "validation"
    output_dir: str = "???"
    crop: int = 512
    patch_size: int | None = None  # None = the encoder's; else its patch kernel is resampled
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    eval_stride: int = 341
    eval_ratios: list[float] = field(
        default_factory=lambda: [1.0]
    )  # MS: [0.5, 0.75, 1, 1.25, 1.5, 1.75]
    eval_flip: bool = False
    eval_mode: str = "slide"  # slide | whole
    channels: int = 768  # UperNet width
    aux_weight: float = 0.4
    drop_path_rate: float = 0.1
    iterations: int = 160000
    batch_size: int = 16  # global
    micro_batch: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    warmup_iterations: int = 1500
    precision: str = "bf16"
    device: str = "auto"
    num_workers: int = 4
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 4000
    eval_every: int = 16000  # 0 = at the end only
