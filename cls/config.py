"""Typed configs of the classification tasks (merged like pretraining configs: schema defaults <-
YAML files <- key=value overrides, typos fail)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderSource:
    checkpoint: str = "???"  # our checkpoint-last.pt / encoder.pt, or an official release
    official_arch: str | None = None  # for official files: e.g. crossmae_vit_base_patch16
    random_init: bool = False  # the checkpoint's architecture, untrained (a baseline)
    seed: int = 0


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
