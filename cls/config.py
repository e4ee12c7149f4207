"""Typed configs of the classification tasks (merged like every config: schema defaults <- YAML
files <- key=value overrides; typos fail). The sections and names are those of pretraining:
``encoder``, ``data``, ``model``, ``optim``, ``train``, ``log``."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.config import EncoderSource, LogConfig, TrainConfig


@dataclass
class ClsData:
    train: str = "???"  # ImageFolder train split
    val: str = "???"  # ImageFolder val split, same classes
    img_size: int = 224
    num_workers: int = 8
    # training augmentation (finetuning; the linear probe uses crop + flip only)
    randaug: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25  # random erasing
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1


@dataclass
class ClsModel:
    global_pool: str = "avg"  # avg (+ fc_norm) | token
    drop_path_rate: float = 0.1
    probe: bool = False  # linear probe: frozen encoder, BatchNorm + Linear head, LARS
    ema_decay: float | None = None  # e.g. 0.9999; None = no EMA


@dataclass
class ClsOptim:
    """AdamW with layer-wise lr decay (finetuning) or LARS (the linear probe)."""

    blr: float = 5e-4  # lr = blr * batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    layer_decay: float | None = 0.65  # None = no layer-wise decay
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float | None = None


@dataclass
class ClsTrain(TrainConfig):
    epochs: int = 100
    batch_size: int = 1024


@dataclass
class FinetuneConfig:
    """End-to-end finetuning, the MAE / CrossMAE recipe (paper Table 11) by default."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = "???"
    data: ClsData = field(default_factory=ClsData)
    model: ClsModel = field(default_factory=ClsModel)
    optim: ClsOptim = field(default_factory=ClsOptim)
    train: ClsTrain = field(default_factory=ClsTrain)
    log: LogConfig = field(default_factory=lambda: LogConfig(every_steps=20))


@dataclass
class LinprobeConfig(FinetuneConfig):
    """The paper's linear probe (MAE's recipe, docs/classification.md): frozen encoder, cls
    token, BatchNorm1d(affine=False) + Linear head, LARS, blr 0.1, batch 16384, 90 epochs (10
    warmup), no weight decay, RandomResizedCrop + flip only. Same loop as finetuning."""

    data: ClsData = field(default_factory=lambda: ClsData(
        randaug=None, reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0))  # fmt: skip
    model: ClsModel = field(
        default_factory=lambda: ClsModel(global_pool="token", drop_path_rate=0.0, probe=True)
    )
    optim: ClsOptim = field(default_factory=lambda: ClsOptim(
        blr=0.1, min_lr=0.0, warmup_epochs=10.0, layer_decay=None, weight_decay=0.0))  # fmt: skip
    train: ClsTrain = field(default_factory=lambda: ClsTrain(epochs=90, batch_size=16384))


@dataclass
class FrozenData:
    train: str = "???"
    val: str = "???"
    img_size: int = 224
    batch_size: int = 256  # feature extraction
    num_workers: int = 2
    cache_dir: str | None = None  # features cached here (None = not cached)


@dataclass
class KnnConfig:
    k: int = 20
    temperature: float = 0.07


@dataclass
class FastProbeConfig:
    """The linear probe on cached features (the paper's recipe: LARS, 90 epochs, batch 16384)."""

    blrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 16384
    weight_decay: float = 0.0


@dataclass
class FrozenEvalConfig:
    """kNN and fast linear probe on frozen features."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    data: FrozenData = field(default_factory=FrozenData)
    pool: str = "cls"  # cls | avg
    knn: KnnConfig = field(default_factory=KnnConfig)
    probe: FastProbeConfig = field(default_factory=FastProbeConfig)
    output: str | None = None  # results JSON written here
