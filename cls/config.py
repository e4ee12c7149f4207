"""Typed configs of the classification tasks (merged like pretraining configs: schema defaults <-
YAML files <- key=value overrides, typos fail)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import EncoderSource


@dataclass
class FrozenEvalConfig:
    """kNN and fast linear probe on frozen features."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    train: str = "???"  # ImageFolder train split
    val: str = "???"  # ImageFolder val split, same classes
    img_size: int = 224
    pool: str = "cls"  # cls | avg
    batch_size: int = 256  # feature extraction
    num_workers: int = 2
    cache_dir: str | None = None  # features cached here (None = not cached)
    output: str | None = None  # results JSON written here
    # kNN
    knn_k: int = 20
    knn_temperature: float = 0.07
    # linear probe on cached features (paper recipe: LARS, 90 epochs, batch 16384, blr 0.1)
    probe_blrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    probe_epochs: int = 90
    probe_warmup_epochs: int = 10
    probe_batch_size: int = 16384
    probe_weight_decay: float = 0.0


@dataclass
class FinetuneConfig:
    """End-to-end finetuning, the MAE / CrossMAE recipe (paper Table 11) by default."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    train: str = "???"
    val: str = "???"
    output_dir: str = "???"
    img_size: int = 224
    global_pool: str = "avg"  # avg (+ fc_norm) | token
    drop_path_rate: float = 0.1
    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 1024  # global
    micro_batch: int | None = None  # per-process forward batch; None = batch_size / processes
    blr: float = 5e-4  # lr = blr * batch_size / 256
    min_lr: float = 1e-6
    layer_decay: float | None = 0.65  # None = no layer-wise decay
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    randaug: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25  # random erasing
    ema_decay: float | None = None  # e.g. 0.9999; None = no EMA
    precision: str = "bf16"
    device: str = "auto"
    num_workers: int = 8
    seed: int = 0
    log_every: int = 20
    probe: bool = False  # linear probe: frozen encoder, BatchNorm + Linear head, LARS


@dataclass
class LinprobeConfig(FinetuneConfig):
    """The paper's linear probe (MAE recipe, REFERENCE.md): frozen encoder, cls token,
    BatchNorm1d(affine=False) + Linear head, LARS, blr 0.1, batch 16384, 90 epochs (10 warmup),
    no weight decay, RandomResizedCrop + flip only. Same loop as finetuning (``probe=True``)."""

    probe: bool = True
    global_pool: str = "token"
    drop_path_rate: float = 0.0
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 16384
    blr: float = 0.1
    min_lr: float = 0.0
    layer_decay: float | None = None
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    randaug: str | None = None
    reprob: float = 0.0
