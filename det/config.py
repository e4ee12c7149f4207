"""Typed config of ViTDet Mask R-CNN training (defaults: ViTDet's ViT-B 100-epoch COCO schedule)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import EncoderSource


@dataclass
class DetConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    train_json: str = "???"  # COCO instances json
    train_images: str = "???"
    val_json: str = "???"
    val_images: str = "???"
    output_dir: str = "???"
    img_size: int = 1024
    patch_size: int | None = None  # None = the encoder's; 16 for ViT-H/14 (resampled, as ViTDet)
    window: int = 14
    drop_path_rate: float = 0.1  # 0.1 B, 0.4 L, 0.5 H
    iterations: int = 184375  # 100 epochs of COCO at batch 64
    batch_size: int = 64  # global
    micro_batch: int | None = None  # per-process forward batch; None = batch_size / processes
    lr: float = 1e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.7  # 0.7 B, 0.8 L, 0.9 H
    warmup_iterations: int = 250
    decay_at: list[float] = field(default_factory=lambda: [0.889, 0.963])  # fractions of training
    precision: str = "bf16"
    device: str = "auto"
    num_workers: int = 4
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 5000
    eval_every: int = 0  # iterations between COCO evaluations (0 = at the end only)
    eval_batch_size: int = 2
