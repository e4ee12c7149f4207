"""Typed config of UperNet training. Defaults: mmsegmentation 1.2.2's
``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`` (MAE ViT-B, ADE20K, 160k)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.checks import (
    FRACTION,
    POSITIVE,
    TRAIN_PRECISION,
    above,
    at_least,
    at_most,
    checked,
    each,
    increasing,
    length,
    not_empty,
    one_of,
    section,
)
from crossmae.config import EncoderSource, EvalConfig, LogConfig, OptimConfig, TrainConfig


@dataclass
class SegData:
    root: str = "???"  # images/<split>/ and annotations/<split>/
    dataset: str = checked("ade20k", one_of("ade20k", "camvid", "custom"))
    num_classes: int = checked(150, POSITIVE)  # custom only (ade20k: 150, camvid: 11)
    ignore_value: int | None = None  # custom only: raw label value of unlabelled pixels
    reduce_zero_label: bool = False  # custom only
    ignore_other_labels: bool = False  # custom only: labels outside 0..C-1 ignored, not an error
    train_split: str = "training"
    val_split: str = "validation"
    images: list[str] | None = checked(None, not_empty)  # only these images (file stems)
    crop: int = checked(512, POSITIVE)
    scale: list[int] = checked([2048, 512], length(2), each(POSITIVE))
    ratio_range: list[float] = checked([0.5, 2.0], length(2), increasing, each(POSITIVE))
    cat_max_ratio: float = checked(0.75, above(0), at_most(1))
    num_workers: int = checked(4, at_least(0), resumable=True)


@dataclass
class SegModel:
    # mmseg's MAE backbone is stride 16 (the neck makes strides 4-32 from it): an encoder of
    # another patch size has its patch kernel and position table resampled
    patch_size: int = checked(16, POSITIVE)
    # blocks feeding the pyramid; None = B: 3, 5, 7, 11
    out_indices: list[int] | None = checked(None, length(4), increasing, each(at_least(0)))
    channels: int = checked(768, POSITIVE)  # UperNet width
    aux_channels: int = checked(256, POSITIVE)  # auxiliary FCN head width
    pool_scales: list[int] = checked([1, 2, 3, 6], not_empty, each(POSITIVE))
    drop_path_rate: float = checked(0.1, *FRACTION)
    aux_weight: float = checked(0.4, at_least(0))
    # mmseg's CrossEntropyLoss(avg_non_ignore=False): the summed loss of the labelled pixels
    # divided by all pixels; true divides by the labelled pixels only
    loss_avg_non_ignore: bool = False


@dataclass
class SegEval(EvalConfig):
    every_steps: int = checked(16000, at_least(0))  # 0 = at the end only
    stride: int = checked(341, POSITIVE)
    ratios: list[float] = checked([1.0], not_empty, each(POSITIVE))  # MS: [0.5, ..., 1.75]
    flip: bool = False
    mode: str = checked("slide", one_of("slide", "whole"))
    precision: str = checked("fp32", TRAIN_PRECISION)  # mmseg evaluates in full precision


@dataclass
class SegConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = checked("???", resumable=True)
    data: SegData = field(default_factory=SegData)
    model: SegModel = field(default_factory=SegModel)
    # mmseg's AdamW lr 1e-4, wd 0.05 but on 1-d parameters (its LayerDecayOptimizerConstructor
    # compares unprefixed names, so backbone.pos_embed / cls_token are decayed: add pos_embed and
    # cls_token to no_weight_decay to exempt them), layer decay 0.65; schedule "linear_poly":
    # mmseg 1.x's LinearLR (from 1e-6) over 1500 steps then PolyLR; "poly": mmseg 0.x's poly over
    # the whole run times a linear warmup factor, the schedule the published MAE / BEiT numbers
    # were trained with (at most 1 % of the base lr apart)
    optim: OptimConfig = section(
        OptimConfig, lr=1e-4, weight_decay=0.05, layer_decay=0.65, schedule="linear_poly",
        warmup_steps=1500, warmup_start=1e-6,
    )  # fmt: skip
    # mmseg's AmpOptimWrapper: fp16, dynamic scale
    train: TrainConfig = section(TrainConfig, steps=160000, batch_size=16, precision="fp16")
    log: LogConfig = section(LogConfig, resumable=True, every_steps=50, ckpt_every_steps=4000)
    eval: SegEval = section(SegEval, resumable=True)
