"""Typed configuration: dataclass schemas merged by OmegaConf from YAML files and ``key=value``
overrides in struct mode, so a misspelled key or a wrongly typed value is an error naming it.

The defaults of ``PretrainConfig`` are the laptop demo (a small CrossMAE on scikit-image's photos,
a few CPU minutes); ``configs/pretrain/*.yaml`` hold the paper's settings as diffs against them.
Derived values (the actual learning rate, step counts) are computed by the code that uses them and
logged; they are never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    name: str = "crossmae_vit_tiny_patch8"  # a registered model (crossmae.list_models())
    img_size: int = 64
    patch_size: int | None = None  # None = the registered variant's
    decoder_depth: int | None = 4  # None = the registered variant's
    mask_ratio: float = 0.75  # p
    pred_ratio: float | None = None  # γ (CrossMAE only); None = the model's default (γ = p)
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    # any other constructor argument of the model, e.g. {use_fm: [5, 11], fm_weighting: softmax}
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    path: str | None = None  # ImageFolder root or a flat image folder; None = built-in photos
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    num_workers: int = 2  # loader processes per training process
    gpu_decode: bool = False  # decode JPEGs and crop on the device (needs data.path)
    demo_samples_per_epoch: int = 2048  # random crops per epoch of the built-in photos
    knn_train: str | None = None  # labelled ImageFolder splits for the kNN monitor
    knn_val: str | None = None


@dataclass
class OptimConfig:
    blr: float = 1.5e-3  # base lr: lr = blr * batch_size / 256 * (γ / p); the paper: 1.5e-4
    lr: float | None = None  # absolute lr, overriding the rule above
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 1.0
    clip_grad: float | None = None  # max gradient norm; None = no clipping


@dataclass
class TrainConfig:
    """What every training command shares (``train.*``)."""

    batch_size: int = 128  # global batch (all processes, all accumulation steps)
    micro_batch: int | None = None  # per-process batch of one forward; None = batch / processes
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    precision: str = "bf16"  # bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops


@dataclass
class PretrainTrainConfig(TrainConfig):
    epochs: int = 12
    compile: bool = False
    cuda_graph: bool = False  # replay forward + backward as one CUDA graph (one GPU, no fp16)
    sdpa: str = "auto"  # attention kernel: auto | flash | efficient | cudnn | math
    # compiled step: what torch's partitioner may keep for backward, 1.0 = its fastest choice;
    # lower recomputes more in backward to hold less (crossmae benchmark saved)
    activation_memory_budget: float = 1.0


@dataclass
class LogConfig:
    """What every training command shares (``log.*``)."""

    every_steps: int = 10  # metrics.jsonl / TensorBoard / progress interval
    ckpt_every_steps: int = 0  # checkpoint-last.pt every N steps (0 = at the task's own times)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class PretrainLogConfig(LogConfig):
    keep_every_epochs: int = 0  # also keep checkpoint-epochN.pt every N epochs (0 = never)
    vis_every_epochs: int = 1  # reconstruction PNG of fixed images every N epochs
    vis_images: int = 8
    knn_every_epochs: int = 0  # kNN top-1 of the encoder on data.knn_train/knn_val (0 = off)


@dataclass
class PretrainConfig:
    output_dir: str | None = None  # None = runs/<model>-<date>-<time>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    log: PretrainLogConfig = field(default_factory=PretrainLogConfig)


@dataclass
class EncoderSource:
    checkpoint: str = "???"  # one of our checkpoint-last.pt / encoder.pt, or an official release
    official_arch: str | None = None  # for official files: e.g. crossmae_vit_base_patch16
    random_init: bool = False  # the checkpoint's architecture, untrained (a baseline)
    seed: int = 0


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def load_config(
    schema: type,
    files: list[str | Path] = (),
    overrides: list[str] = (),
    base: dict[str, Any] | None = None,
) -> DictConfig:
    """Schema defaults <- ``base`` (e.g. a checkpoint's config) <- each YAML file in order <-
    ``key=value`` overrides, in struct mode.

    A file may mark a value ``???`` (e.g. ``data.path``): it must then be set by a later file or
    an override. Raises ConfigError naming the offending key (unknown key, wrong type, missing
    required value, unreadable file).
    """
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_free_dicts(cfg)
    required: set[str] = set()  # keys a file marks "???": a later file or an override must set them
    try:
        if base is not None:
            cfg = OmegaConf.merge(cfg, base)
        for f in files:
            for diff in _file_chain(Path(f)):
                required |= set(OmegaConf.missing_keys(diff))
                cfg = OmegaConf.merge(cfg, diff)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"config key {getattr(e, 'full_key', '?')!r}: {msg}") from None
    missing = sorted(k for k in required if OmegaConf.select(cfg, k) is None)
    if missing:
        raise ConfigError(f"set the required value(s) {missing}, e.g. {missing[0]}=...")
    return cfg


BASE_KEY = "_base_"


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A config file and the files it builds on, base first: a file's ``_base_: other.yaml``
    (relative to the file) is read before it, so a large model's file holds only what differs
    from the base one."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: {BASE_KEY} chain loops back to itself")
    diff = OmegaConf.load(path)
    if BASE_KEY not in diff:
        return [diff]
    base = diff.pop(BASE_KEY)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY} must be one file name, got {base!r}")
    return [*_file_chain(path.parent / base, (*seen, path.resolve())), diff]


def _open_free_dicts(cfg: DictConfig) -> None:
    """Free-form ``dict[str, Any]`` fields (e.g. ``model.kwargs``) accept new keys."""
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            if OmegaConf.get_type(node) is dict:
                OmegaConf.set_struct(node, False)
            else:
                _open_free_dicts(node)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy (for checkpoints and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)


def without_missing(values: dict) -> dict:
    """``values`` (a saved config) less its unset (``???``) entries, at every depth."""
    return {k: without_missing(v) if isinstance(v, dict) else v
            for k, v in values.items() if v != "???"}  # fmt: skip


def parse_settings(items: list[str]) -> dict:
    """``key=value`` strings (a command's settings) -> a dict of typed values (YAML: 12, 1e-06,
    true, [-1])."""
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"settings must be key=value, got {bad}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))
