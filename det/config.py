"""Typed config of ViTDet Mask R-CNN training. Defaults: detectron2's
``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` (ViT-B, COCO, 100 epochs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import EncoderSource, LogConfig, TrainConfig

from .model import HeadConfig


@dataclass
class DetData:
    train_json: str = "???"  # COCO instances json
    train_images: str = "???"
    val_json: str = "???"
    val_images: str = "???"
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])  # large-scale jitter
    num_workers: int = 4


@dataclass
class DetModel:
    img_size: int = 1024  # the square canvas (detectron2's square_pad) and the LSJ / test size
    patch_size: int | None = None  # None = the encoder's; 16 for ViT-H/14 (kernel resampled)
    pretrain_img_size: int | None = None  # None = the encoder's (224): its position grid is kept
    window: int = 14
    global_blocks: list[int] | None = None  # None = 4 evenly spaced (B: 2, 5, 8, 11)
    drop_path_rate: float = 0.1  # 0.1 B, 0.4 L, 0.5 H
    heads: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DetOptim:
    """AdamW, betas 0.9 / 0.999."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    weight_decay_norm: float | None = 0.0  # the ViT's LayerNorms; None = weight_decay (ViT-H)
    pos_embed_weight_decay: float | None = 0.0  # None = weight_decay (ViT-H)
    layer_decay: float = 0.7  # 0.7 B, 0.8 L, 0.9 H
    warmup_steps: int = 250
    warmup_factor: float = 0.001
    lr_milestones: list[int] = field(default_factory=lambda: [163889, 177546])  # x0.1 at each
    clip_grad: float | None = None


@dataclass
class DetTrain(TrainConfig):
    steps: int = 184375  # 100 epochs of COCO at batch 64
    batch_size: int = 64
    precision: str = "fp16"  # detectron2's AMPTrainer: fp16 autocast + gradient scaling
    ddp_fp16_compression: bool = True  # gradients all-reduced in fp16 (detectron2's ViTDet)


@dataclass
class DetEval:
    every_steps: int = 0  # steps between COCO evaluations (0 = at the end only)
    batch_size: int = 1
    precision: str = "fp32"  # detectron2 evaluates in full precision


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
