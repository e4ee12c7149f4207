"""Typed configs of the classification tasks (merged like every config: schema defaults <- YAML
files <- key=value overrides; typos fail). The sections and names are those of pretraining:
``encoder``, ``data``, ``model``, ``optim``, ``train``, ``log``."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossmae.checks import (
    FRACTION,
    POSITIVE,
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
from crossmae.config import (
    EncoderSource,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)


@dataclass
class ClsData:
    train: str = "???"  # ImageFolder train split
    val: str = "???"  # ImageFolder val split, same classes
    img_size: int = checked(224, POSITIVE)
    per_class: int | None = checked(None, POSITIVE)  # only the first N images of each class
    num_workers: int = checked(8, at_least(0), resumable=True)
    # training augmentation (finetuning; the linear probe uses crop + flip only)
    crop_scale: list[float] = checked(
        [0.08, 1.0], length(2), increasing, each(above(0), at_most(1))
    )
    randaug: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = checked(0.25, at_least(0), at_most(1))  # random erasing
    mixup: float = checked(0.8, at_least(0))
    cutmix: float = checked(1.0, at_least(0))
    label_smoothing: float = checked(0.1, *FRACTION)


@dataclass
class ClsModel:
    global_pool: str = checked("avg", one_of("avg", "token"))  # avg (+ fc_norm) | token
    drop_path_rate: float = checked(0.1, *FRACTION)
    probe: bool = False  # linear probe: frozen encoder, BatchNorm + Linear head, LARS
    ema_decay: float | None = checked(None, above(0), at_most(1))  # e.g. 0.9999; None = off


@dataclass
class FinetuneConfig:
    """End-to-end finetuning, the MAE / CrossMAE recipe (paper Table 11) by default: AdamW, lr =
    blr x batch / 256, layer decay, no weight decay on 1-d parameters, the position table and
    the cls token, warmup + cosine."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = checked("???", resumable=True)
    data: ClsData = field(default_factory=ClsData)
    model: ClsModel = field(default_factory=ClsModel)
    optim: OptimConfig = section(
        OptimConfig, blr=5e-4, min_lr=1e-6, warmup_epochs=5.0, layer_decay=0.65,
        weight_decay=0.05, no_weight_decay=["1d", "pos_embed", "cls_token"],
    )  # fmt: skip
    train: TrainConfig = section(TrainConfig, epochs=100, batch_size=1024)
    log: LogConfig = section(LogConfig, resumable=True, every_steps=20, ckpt_every_epochs=1)
    eval: EvalConfig = section(EvalConfig, resumable=True)  # auto: MAE evaluates under autocast


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
    optim: OptimConfig = section(OptimConfig, name="lars", blr=0.1, warmup_epochs=10.0)
    train: TrainConfig = section(TrainConfig, epochs=90, batch_size=16384)


@dataclass
class FrozenData:
    train: str = "???"
    val: str = "???"
    img_size: int = checked(224, POSITIVE)
    batch_size: int = checked(256, POSITIVE)  # feature extraction
    num_workers: int = checked(2, at_least(0), resumable=True)
    cache_dir: str | None = None  # features cached here (None = not cached)


@dataclass
class FrozenModel:
    pool: str = checked("cls", one_of("cls", "avg"))  # kNN's feature: cls token or patch mean


@dataclass
class KnnConfig:
    k: int = checked(20, POSITIVE)  # knn_top1 / knn_top5
    ks: list[int] = checked([10, 20, 100, 200], not_empty, each(POSITIVE))  # all in knn_by_k
    temperature: float = checked(0.07, POSITIVE)


@dataclass
class FastProbeConfig:
    """The linear probe on cached features (the paper's recipe: LARS, 90 epochs, batch 16384),
    as dinov2's linear evaluation runs it: one head per base lr x last-n blocks concatenated x
    pooling (cls token, patch mean, both), all trained in one pass over the same batches; the
    best is reported, the whole grid in results.json."""

    blrs: list[float] = checked([0.01, 0.03, 0.1, 0.3, 1.0], not_empty, each(POSITIVE))
    n_blocks: list[int] = checked([1, 4], not_empty, each(POSITIVE))
    pools: list[str] = checked(["cls", "avg", "cls+avg"], not_empty,
                               each(one_of("cls", "avg", "cls+avg")))  # fmt: skip
    epochs: int = checked(90, POSITIVE)
    warmup_epochs: int = checked(10, at_least(0))
    batch_size: int = checked(16384, POSITIVE)
    weight_decay: float = checked(0.0, at_least(0))


@dataclass
class FrozenEvalConfig:
    """kNN and fast linear probe on frozen features (an evaluation: no optimizer, no steps)."""

    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str | None = checked(None, resumable=True)  # results.json etc.; None = print only
    data: FrozenData = field(default_factory=FrozenData)
    model: FrozenModel = field(default_factory=FrozenModel)
    knn: KnnConfig = field(default_factory=KnnConfig)
    probe: FastProbeConfig = field(default_factory=FastProbeConfig)
    train: RunConfig = field(default_factory=RunConfig)
    # also the same architecture untrained (encoder.random_init=true, encoder.seed), evaluated the
    # same way and reported beside with the gain: what a small-data number is worth
    control: bool = False
