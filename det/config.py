"""Typed config of ViTDet Mask R-CNN training. Defaults: detectron2's
``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` (ViT-B, COCO, 100 epochs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import (
    FRACTION,
    POSITIVE,
    PRECISION,
    EncoderSource,
    LogConfig,
    TrainConfig,
    above,
    at_least,
    at_most,
    checked,
    each,
    increasing,
    length,
)

from .model import HeadConfig


@dataclass
class DetData:
    train_json: str = "???"  # COCO instances json
    train_images: str = "???"
    val_json: str = "???"
    val_images: str = "???"
    scale_range: list[float] = checked([0.1, 2.0], length(2), increasing, each(POSITIVE))  # LSJ
    num_workers: int = checked(4, at_least(0))


@dataclass
class DetModel:
    # the square canvas (detectron2's square_pad) and the LSJ / test size
    img_size: int = checked(1024, POSITIVE)
    patch_size: int | None = checked(None, POSITIVE)  # None = the encoder's; 16 for ViT-H/14
    pretrain_img_size: int | None = checked(None, POSITIVE)  # None = the encoder's (224)
    window: int = checked(14, POSITIVE)
    global_blocks: list[int] | None = None  # None = 4 evenly spaced (B: 2, 5, 8, 11)
    drop_path_rate: float = checked(0.1, *FRACTION)  # 0.1 B, 0.4 L, 0.5 H
    heads: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DetOptim:
    """AdamW, betas 0.9 / 0.999."""

    lr: float = checked(1e-4, POSITIVE)
    weight_decay: float = checked(0.1, at_least(0))
    # the ViT's LayerNorms; None = weight_decay (ViT-H)
    weight_decay_norm: float | None = checked(0.0, at_least(0))
    pos_embed_weight_decay: float | None = checked(0.0, at_least(0))  # None = wd (ViT-H)
    layer_decay: float = checked(0.7, above(0), at_most(1))  # 0.7 B, 0.8 L, 0.9 H
    warmup_steps: int = checked(250, at_least(0))
    warmup_factor: float = checked(0.001, above(0), at_most(1))
    lr_milestones: list[int] = checked([163889, 177546], increasing)  # x0.1 at each
    clip_grad: float | None = checked(None, POSITIVE)


@dataclass
class DetTrain(TrainConfig):
    steps: int = checked(184375, POSITIVE)  # 100 epochs of COCO at batch 64
    batch_size: int = checked(64, POSITIVE)
    precision: str = checked("fp16", PRECISION)  # detectron2's AMPTrainer: fp16 + loss scaling
    ddp_fp16_compression: bool = True  # gradients all-reduced in fp16 (detectron2's ViTDet)


@dataclass
class DetEval:
    every_steps: int = checked(0, at_least(0))  # steps between COCO evaluations (0 = at the end)
    batch_size: int = checked(1, POSITIVE)
    precision: str = checked("fp32", PRECISION)  # detectron2 evaluates in full precision


@dataclass
class DetConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = "???"
    data: DetData = field(default_factory=DetData)
    model: DetModel = field(default_factory=DetModel)
    optim: DetOptim = field(default_factory=DetOptim)
    train: DetTrain = field(default_factory=DetTrain)
    log: LogConfig = field(default_factory=lambda: LogConfig(every_steps=20, ckpt_every_steps=5000))
    eval: DetEval = field(default_factory=DetEval)
