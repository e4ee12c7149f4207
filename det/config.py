"""Typed config of ViTDet Mask R-CNN training. Defaults: detectron2's
``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` (ViT-B, COCO, 100 epochs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.checks import (
    FRACTION,
    POSITIVE,
    TRAIN_PRECISION,
    at_least,
    checked,
    each,
    increasing,
    length,
    not_empty,
    one_of,
    section,
)
from crossmae.config import EncoderSource, EvalConfig, LogConfig, OptimConfig, TrainConfig

from .model import HeadConfig


@dataclass
class DetData:
    train_json: str = "???"  # COCO instances json
    train_images: str = "???"
    val_json: str = "???"
    val_images: str = "???"
    scale_range: list[float] = checked([0.1, 2.0], length(2), increasing, each(POSITIVE))  # LSJ
    # only these image ids of each json, trained and scored (small checks: the overfit config)
    image_ids: list[int] | None = checked(None, not_empty)
    num_workers: int = checked(4, at_least(0), resumable=True)


@dataclass
class DetModel:
    # the square canvas (detectron2's square_pad) and the LSJ / test size
    img_size: int = checked(1024, POSITIVE)
    # ViTDet's stride 16 (its pyramid's scales assume it): an encoder of another patch size
    # (ViT-H/14, the 8-px laptop model) has its patch kernel and position table resampled
    patch_size: int = checked(16, POSITIVE)
    pretrain_img_size: int | None = checked(None, POSITIVE)  # None = the encoder's (224)
    window: int = checked(14, POSITIVE)
    global_blocks: list[int] | None = None  # None = 4 evenly spaced (B: 2, 5, 8, 11)
    drop_path_rate: float = checked(0.1, *FRACTION)  # 0.1 B, 0.4 L, 0.5 H
    # "sdpa": F.scaled_dot_product_attention with the relative-position bias as its mask (the
    # (N, N) logits are never stored); "explicit": detectron2's arithmetic, logits and softmax
    # held for backward (the same numbers, about a third more memory for ViTDet-B at 1024 px)
    attention: str = checked("sdpa", one_of("sdpa", "explicit"))
    # RoIs sampled per training image for the box and mask heads (ROI_HEADS.BATCH_SIZE_PER_IMAGE)
    roi_batch_size: int = checked(512, POSITIVE)
    heads: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DetTrain(TrainConfig):
    ddp_fp16_compression: bool = True  # gradients all-reduced in fp16 (detectron2's ViTDet)


@dataclass
class DetEval(EvalConfig):
    every_steps: int = checked(0, at_least(0))  # steps between COCO evaluations (0 = at the end)
    batch_size: int = checked(1, POSITIVE)
    precision: str = checked("fp32", TRAIN_PRECISION)  # detectron2 evaluates in full precision


@dataclass
class DetConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = checked("???", resumable=True)
    data: DetData = field(default_factory=DetData)
    model: DetModel = field(default_factory=DetModel)
    # detectron2's ViTDet: AdamW lr 1e-4, betas 0.9 / 0.999, weight decay 0.1 on everything but
    # the ViT's LayerNorms and position table (ViT-H: on everything), layer decay 0.7 (B), 250
    # warmup iterations from 0.1 %, x0.1 at 88.9 % and 96.3 % of training
    optim: OptimConfig = section(
        OptimConfig, lr=1e-4, weight_decay=0.1, no_weight_decay=["layernorm", "pos_embed"],
        layer_decay=0.7, schedule="multistep", warmup_steps=250, warmup_start=0.001,
        milestones=[163889, 177546],
    )  # fmt: skip
    # 100 epochs of COCO at batch 64; detectron2's AMPTrainer: fp16 + loss scaling
    train: DetTrain = section(DetTrain, steps=184375, batch_size=64, precision="fp16")
    log: LogConfig = section(LogConfig, resumable=True, every_steps=20, ckpt_every_steps=5000)
    eval: DetEval = section(DetEval, resumable=True)
