"""Typed config of UperNet training. Defaults: mmsegmentation 1.2.2's
``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`` (MAE ViT-B, ADE20K, 160k)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import EncoderSource, LogConfig, TrainConfig


@dataclass
class SegData:
    root: str = "???"  # images/<split>/ and annotations/<split>/
    dataset: str = "ade20k"  # ade20k | camvid | custom
    num_classes: int = 150  # custom only (ade20k: 150, camvid: 11)
    ignore_value: int | None = None  # custom only: raw label value of unlabelled pixels
    reduce_zero_label: bool = False  # custom only
    train_split: str = "training"
    val_split: str = "validation"
    crop: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    num_workers: int = 4


@dataclass
class SegModel:
    patch_size: int | None = None  # None = the encoder's; else its patch kernel is resampled
    out_indices: list[int] | None = None  # blocks feeding the pyramid; None = B: 3, 5, 7, 11
    channels: int = 768  # UperNet width
    aux_channels: int = 256  # auxiliary FCN head width
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    drop_path_rate: float = 0.1
    aux_weight: float = 0.4
    # mmseg's CrossEntropyLoss(avg_non_ignore=False): the summed loss of the labelled pixels
    # divided by all pixels; true divides by the labelled pixels only
    loss_avg_non_ignore: bool = False


@dataclass
class SegOptim:
    """AdamW."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    # mmseg's LayerDecayOptimizerConstructor misses backbone.pos_embed / cls_token in its no-decay
    # check (it compares unprefixed names), so they are decayed; false exempts them
    decay_pos_embed: bool = True
    warmup_steps: int = 1500
    # "mmseg1": mmseg 1.x's LinearLR (from 1e-6) then PolyLR, as its config schedules it;
    # "mmseg0": mmseg 0.x's poly over the whole run times a linear warmup factor, the schedule
    # the published MAE / BEiT numbers were trained with (at most 1 % of the base lr apart)
    lr_schedule: str = "mmseg1"
    clip_grad: float | None = None


@dataclass
class SegTrain(TrainConfig):
    steps: int = 160000
    batch_size: int = 16
    precision: str = "fp16"  # the config's AmpOptimWrapper: fp16 autocast, dynamic loss scale


@dataclass
class SegEval:
    every_steps: int = 16000  # 0 = at the end only
    stride: int = 341
    ratios: list[float] = field(default_factory=lambda: [1.0])  # MS: [0.5, 0.75, ..., 1.75]
    flip: bool = False
    mode: str = "slide"  # slide | whole
    precision: str = "fp32"  # mmseg evaluates in full precision


@dataclass
class SegConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = "???"
    data: SegData = field(default_factory=SegData)
    model: SegModel = field(default_factory=SegModel)
    optim: SegOptim = field(default_factory=SegOptim)
    train: SegTrain = field(default_factory=SegTrain)
    log: LogConfig = field(default_factory=lambda: LogConfig(every_steps=50, ckpt_every_steps=4000))
    eval: SegEval = field(default_factory=SegEval)
