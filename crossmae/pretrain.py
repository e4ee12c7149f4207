"""Pretraining of CrossMAE and MAE as a task (``crossmae.task``), run by the one runner
(``crossmae.runner.run_task``): ``crossmae pretrain``.

What is pretraining's own: the model of ``config.PretrainConfig.model``, random crops of an image
folder (or of scikit-image's photos) with a mask drawn per sample, the lr rule ``blr x batch / 256
x γ / p`` (paper App. A.6), the model's named losses, an optional kNN monitor on a labelled split,
reconstruction PNGs and the loss curve, and the encoder export ``encoder.pt`` (timm key names,
written at the end of a finished run). A run folder holds ``config.yaml``, ``log.txt``,
``metrics.jsonl``, TensorBoard events, ``checkpoint-last.pt``, ``encoder.pt``, ``results.json``,
``loss.png`` and ``recon/epoch-*.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config as functorch_config
from omegaconf import DictConfig
from torch import nn

from . import distributed as du
from .checkpoint import PRETRAIN_FORMAT
from .checks import (
    FRACTION,
    POSITIVE,
    above,
    at_least,
    at_most,
    below,
    checked,
    each,
    increasing,
    length,
    one_of,
    registered_model,
    section,
)
from .config import ConfigError, LogConfig, OptimConfig, TrainConfig, to_plain
from .data import (
    BuiltinPhotos,
    EvalTransform,
    ImageFiles,
    PretrainSamples,
    PretrainTransform,
    collate,
)
from .data.gpu import JpegSamples, collate_raw, decode_batch
from .engine import Engine, Hook
from .evaluation import Evaluation
from .knn import extract_features, knn_classify, topk_accuracy
from .models import create_model, model_class
from .models.crossmae import CrossMAE
from .models.layers import sdpa_device_problem, set_attention_backend
from .models.pretrained import encoder_export
from .models.registry import describe
from .online_probe import OnlineProbe, probe_splits
from .reconstruction import masked_psnr, reconstruct
from .task import Task, register_task
from .visualize import save_loss_curve, save_reconstruction_grid

log = logging.getLogger("crossmae")


# ----------------------------------------------------------------------------- the schema
@dataclass
class ModelConfig:
    name: str = checked("crossmae_vit_tiny_patch8", registered_model)  # crossmae models lists them
    img_size: int = checked(64, POSITIVE)
    patch_size: int | None = checked(None, POSITIVE)  # None = the registered variant's
    decoder_depth: int | None = checked(4, POSITIVE)  # None = the registered variant's
    mask_ratio: float = checked(0.75, above(0), below(1))  # p
    pred_ratio: float | None = checked(None, above(0), at_most(1))  # γ (CrossMAE only); None = p
    norm_pix_loss: bool = True
    drop_path_rate: float = checked(0.0, *FRACTION)
    # any other constructor argument of the model, e.g. {use_fm: [5, 11], fm_weighting: softmax}
    kwargs: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def cross_checks(m: DictConfig) -> dict[str, str]:
        found = {}
        if m.pred_ratio is not None and m.pred_ratio > m.mask_ratio:
            found["pred_ratio"] = f"γ={m.pred_ratio} must be at most the mask ratio {m.mask_ratio}"
        if m.patch_size is not None and m.img_size % m.patch_size:
            found["img_size"] = f"{m.img_size} is not a multiple of patch_size {m.patch_size}"
        return found


@dataclass
class DataConfig:
    path: str | None = None  # ImageFolder root or a flat image folder; None = built-in photos
    crop_scale: list[float] = checked([0.2, 1.0], length(2), increasing, each(above(0), at_most(1)))
    # loader processes per training process
    num_workers: int = checked(2, at_least(0), resumable=True)
    gpu_decode: bool = False  # decode JPEGs and crop on the device (needs data.path)
    demo_samples_per_epoch: int = checked(2048, POSITIVE)  # crops per epoch of the built-in photos
    knn_train: str | None = None  # labelled ImageFolder splits for the kNN monitor
    knn_val: str | None = None


@dataclass
class PretrainTrainConfig(TrainConfig):
    compile: bool = checked(False, resumable=True)
    # replay forward + backward as one CUDA graph (one GPU, no fp16)
    cuda_graph: bool = checked(False, resumable=True)
    sdpa: str = checked("auto", one_of("auto", "flash", "efficient", "cudnn", "math"),
                        resumable=True)  # fmt: skip
    # compiled step: what torch's partitioner may keep for backward, 1.0 = its fastest choice;
    # lower recomputes more in backward to hold less (crossmae benchmark saved)
    activation_memory_budget: float = checked(1.0, at_least(0), at_most(1), resumable=True)


@dataclass
class PretrainLogConfig(LogConfig):
    vis_every_epochs: int = checked(1, at_least(0))  # reconstruction PNG every N epochs
    vis_images: int = checked(8, POSITIVE)
    knn_every_epochs: int = checked(0, at_least(0))  # kNN top-1 on data.knn_train/val (0 = off)


@dataclass
class OnlineProbeConfig:
    """A linear head trained on the stop-gradient cls token alongside pretraining, its top-1
    on ``val`` logged (``crossmae/online_probe.py``; needs ``data.path`` as class folders)."""

    val: str | None = None  # held-out class-folder split of data.path's classes; None = off
    lr: float = checked(0.1, POSITIVE)  # SGD with momentum 0.9 (solo-learn's online probe)
    every_epochs: int = checked(1, POSITIVE, resumable=True)


@dataclass
class PretrainConfig:
    output_dir: str | None = checked(None, resumable=True)  # None = runs/<model>-<date>-<time>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)
    optim: OptimConfig = section(OptimConfig, blr=1.5e-3, weight_decay=0.05, betas=[0.9, 0.95],
                                 warmup_epochs=1.0)  # fmt: skip
    train: PretrainTrainConfig = section(PretrainTrainConfig, epochs=12)
    log: PretrainLogConfig = section(PretrainLogConfig, resumable=True, ckpt_every_epochs=1)


OWN_SETTINGS = (
    "img_size",
    "mask_ratio",
    "norm_pix_loss",
    "drop_path_rate",
    "patch_size",
    "decoder_depth",
    "pred_ratio",
)  # model.X, never model.kwargs.X


def check_kwargs(mcfg: ModelConfig) -> None:
    """``model.kwargs`` may not repeat a setting the model section has (it would be ignored)."""
    if twice := [k for k in OWN_SETTINGS if k in mcfg.kwargs]:
        raise ConfigError(f"model.kwargs.{twice[0]}: the model section has its own setting, "
                          f"model.{twice[0]}; set that one")  # fmt: skip


def build_model(mcfg: ModelConfig) -> nn.Module:
    """The registered model named by the config, with the config's settings applied."""
    check_kwargs(mcfg)
    kwargs = dict(mcfg.kwargs)
    kwargs.update(
        img_size=mcfg.img_size,
        mask_ratio=mcfg.mask_ratio,
        norm_pix_loss=mcfg.norm_pix_loss,
        drop_path_rate=mcfg.drop_path_rate,
    )
    for key in ("patch_size", "decoder_depth", "pred_ratio"):
        if getattr(mcfg, key) is not None:
            kwargs[key] = getattr(mcfg, key)
    if mcfg.pred_ratio is None and issubclass(model_class(mcfg.name), CrossMAE):
        kwargs["pred_ratio"] = mcfg.mask_ratio  # γ = p unless set
    try:
        return create_model(mcfg.name, **kwargs)
    except ValueError as e:  # a setting the model does not take (e.g. pred_ratio for MAE)
        raise ConfigError(str(e)) from None


def pretrain_losses(
    model: nn.Module, imgs: torch.Tensor, ids_shuffle: torch.Tensor, *, budget: float = 1.0
) -> dict[str, torch.Tensor]:
    """The losses of a pretraining step: the model's named losses and their sum. ``budget``: the
    activation memory budget the compiled step is partitioned with (read when it compiles)."""
    with functorch_config.patch(activation_memory_budget=budget):
        out = model(imgs, ids_shuffle=ids_shuffle, with_pred=False)
    parts = {n: v for n, v in out.items() if n.startswith("loss_")}
    return {**parts, "loss": sum(parts.values())}


@register_task
class PretrainTask(Task):
    """CrossMAE / MAE pretraining (module docstring)."""

    name = "pretrain"
    command = ("pretrain",)
    help = "pretrain CrossMAE / MAE (no arguments: a small CrossMAE on built-in photos)"
    schema = PretrainConfig
    format = PRETRAIN_FORMAT

    def __init__(self, cfg):
        super().__init__(cfg)
        self.skipped: list[str] = []  # unreadable files met so far (this process)

    # ------------------------------------------------------------------ settings and data
    def open_data(self) -> None:
        tc, d = self.cfg.train, self.cfg.data
        if problem := sdpa_device_problem(tc.sdpa, self.device.type):
            raise ConfigError(f"train.sdpa={problem}")
        if tc.activation_memory_budget != 1.0 and not tc.compile:
            raise ConfigError("train.activation_memory_budget applies to the compiled step: "
                              "set train.compile=true")  # fmt: skip
        check_kwargs(self.cfg.model)
        self.source = ImageFiles(d.path) if d.path else BuiltinPhotos(d.demo_samples_per_epoch)
        self.knn_splits = []
        if self.cfg.log.knn_every_epochs:
            if not (d.knn_train and d.knn_val):
                raise ConfigError("log.knn_every_epochs needs data.knn_train and data.knn_val")
            self.knn_splits = [ImageFiles(d.knn_train), ImageFiles(d.knn_val)]
            if self.knn_splits[0].classes != self.knn_splits[1].classes or not (
                self.knn_splits[0].classes
            ):
                raise ConfigError("data.knn_train and data.knn_val need the same class folders")
        self.probe_val = probe_splits(d.path, self.cfg.probe.val) if self.cfg.probe.val else None
        self.online_probe: OnlineProbe | None = None
        self.last_batch = None

    def output_dir(self) -> str:
        return self.cfg.output_dir or str(
            Path("runs") / f"{self.cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
        )

    def resolve(self, cfg) -> None:
        """γ = p unless set (CrossMAE; MAE predicts every masked patch and has no γ); the patch
        size and decoder depth of the registered variant unless set (config.yaml says what
        ran)."""
        m = cfg.model
        if m.pred_ratio is None and issubclass(model_class(m.name), CrossMAE):
            m.pred_ratio = m.mask_ratio
        if m.patch_size is None or m.decoder_depth is None:
            with torch.device("meta"):  # the architecture only
                built = build_model(m)
            m.patch_size = m.patch_size or built.patch_size
            m.decoder_depth = m.decoder_depth or built.config["decoder_depth"]

    def engine_options(self) -> dict:
        tc = self.cfg.train
        return {"compile": tc.compile, "cuda_graph": tc.cuda_graph,
                "prefetch": not self.cfg.data.gpu_decode}  # fmt: skip

    # ------------------------------------------------------------------ model and data
    def build_model(self, device: torch.device) -> nn.Module:
        model = set_attention_backend(build_model(self.cfg.model).to(device), self.cfg.train.sdpa)
        self.mask_ratio = model.mask_ratio
        self.pred_ratio = getattr(model, "pred_ratio", model.mask_ratio)
        ratios = (f"p={self.mask_ratio:.2f} γ={self.pred_ratio:.2f}" if isinstance(model, CrossMAE)
                  else f"p={self.mask_ratio:.2f}, every masked patch predicted")  # fmt: skip
        log.info("%s: %s, compile %s, CUDA graph %s, attention %s",
                 describe(self.cfg.model.name, model.config), ratios, self.cfg.train.compile,
                 self.cfg.train.cuda_graph, self.cfg.train.sdpa)  # fmt: skip
        return model

    def lr_factor(self) -> float:
        return self.pred_ratio / self.mask_ratio  # γ / p

    def train_set(self):
        d, size, src = self.cfg.data, self.cfg.model.img_size, self.source
        if isinstance(src, ImageFiles):
            log.info("data: %d images in %s (%s layout)", len(src), src.root, src.layout)
        else:
            log.info("data: %d crops of %d scikit-image photos per epoch", len(src),
                     len(src.photos))  # fmt: skip
        if d.gpu_decode:  # workers read bytes; the device decodes, crops and resizes
            return JpegSamples(src, size, self.model.mask_sampler, tuple(d.crop_scale))
        # uint8 crops: normalised by the model on the device (a quarter of the bytes to copy)
        transform = PretrainTransform(size, tuple(d.crop_scale), normalize=False)
        return PretrainSamples(src, transform, self.model.mask_sampler)

    def collate_fn(self):
        return collate_raw if self.cfg.data.gpu_decode else collate

    def inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        self.skipped.extend(batch["skipped"])  # each one logged by the worker that met it
        # on CUDA the prefetcher has copied them already (or the device decodes them)
        if self.cfg.data.gpu_decode:
            imgs = decode_batch(batch, self.cfg.model.img_size, device)
        else:
            imgs = batch["images"].to(device, non_blocking=True)
        if self.probe_val is not None:  # what the online probe learns from after the step
            self.last_batch = (imgs, batch["labels"].to(device, non_blocking=True))
        return {"imgs": imgs, "ids_shuffle": batch["ids_shuffle"].to(device, non_blocking=True)}

    def losses(self, model, imgs: torch.Tensor, ids_shuffle: torch.Tensor) -> dict:
        budget = self.cfg.train.activation_memory_budget
        return pretrain_losses(model, imgs, ids_shuffle, budget=budget)

    # ------------------------------------------------------------------ memory planning
    def plan_data(self) -> None:
        self.probe_val, self.knn_splits = None, []

    def example_batch(self, batch: int, training: bool = True) -> dict:
        size, model = self.cfg.model.img_size, self.model
        ids = torch.argsort(torch.rand(batch, model.num_patches), dim=1)
        return {"images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),
                "ids_shuffle": ids, "labels": torch.zeros(batch, dtype=torch.long),
                "skipped": []}  # fmt: skip

    # ------------------------------------------------------------------ the kNN monitor
    def evaluation(self) -> Evaluation | None:
        if not self.knn_splits:
            return None
        return Evaluation(self.knn_monitor, every_epochs=self.cfg.log.knn_every_epochs,
                          line=lambda m: f"kNN top-1 {m['top1']:.2f}", group="knn",
                          prefix="knn_")  # fmt: skip

    def knn_monitor(self, step: int) -> dict:
        """kNN top-1 / top-5 (k = 20) of the encoder's average-pooled features."""
        feats = [
            extract_features(self.model.encoder, split, img_size=self.cfg.model.img_size,
                             pool="avg", num_workers=self.cfg.data.num_workers, device=self.device)
            for split in self.knn_splits
        ]  # fmt: skip
        self.model.train()
        (ftr, ytr), (fva, yva) = feats
        scores = knn_classify(ftr, ytr, fva, num_classes=len(self.knn_splits[0].classes))
        return topk_accuracy(scores, yva)

    # ------------------------------------------------------------------ checkpoints and results
    def checkpoint_fields(self) -> dict:
        m = self.model
        return {"model_name": self.cfg.model.name, "model_config": m.config,
                "mask_ratio": self.mask_ratio, "pred_ratio": self.pred_ratio,
                "norm_pix_loss": m.norm_pix_loss, "img_size": self.cfg.model.img_size,
                "patch_size": m.patch_size, "skipped": self.skipped}  # fmt: skip

    def restore(self, ckpt: dict) -> None:
        self.skipped.extend(ckpt.get("skipped", []))

    def hooks(self) -> list[Hook]:
        hooks: list[Hook] = [ReconstructionImages(self, Path(self.output_dir()))]
        if self.probe_val is not None:
            p = self.cfg.probe
            self.online_probe = OnlineProbe(
                self, self.probe_val, lr=p.lr, every_epochs=p.every_epochs, seed=self.cfg.train.seed
            )
            hooks.append(self.online_probe)
        return hooks

    def record_fields(self) -> dict:
        return {"skipped_files": len(set(self.skipped))}

    def result_fields(self, result: dict) -> dict:
        names = sorted({n for part in du.all_gather_objects(self.skipped) for n in part})
        if names and du.rank() == 0:
            log.warning("skipped %d unreadable files: %s", len(names), ", ".join(names[:10]))
        out = {"skipped_files": len(names), "skipped": names}
        if self.online_probe is not None:
            out["online_probe"] = self.online_probe.last
        return out

    def exports(self, step: int) -> dict:
        """``encoder.pt``: the encoder alone, timm key names (what the transfer tasks read)."""
        extra = {"step": step, "pretrain_config": to_plain(self.cfg)}
        return {"encoder.pt": encoder_export(self.model, model_name=self.cfg.model.name,
                                             extra=extra)}  # fmt: skip

    def after_run(self, result: dict) -> None:
        out = Path(result["output_dir"])
        log.info("look at %s: loss.png, recon/epoch-*.png (reconstructions; epoch-0000.png: "
                 "untrained), metrics.jsonl, tb/; "
                 "checkpoint-last.pt and encoder.pt for the transfer tasks", out)  # fmt: skip


class ReconstructionImages(Hook):
    """Rank 0: the reconstruction PNG of fixed images (every masked patch decoded) and the loss
    curve, before the first step (``epoch-0000.png``: the untrained model), every
    ``log.vis_every_epochs`` epochs and at the end of a run stopped mid-epoch."""

    name = "reconstructions"

    def __init__(self, task: PretrainTask, out: Path):
        self.task, self.out = task, out
        cfg, src = task.cfg, task.source
        span = len(src.photos) if isinstance(src, BuiltinPhotos) else len(src)
        idx = torch.linspace(0, span - 1, min(cfg.log.vis_images, span)).long().tolist()
        images = PretrainSamples(src, EvalTransform(cfg.model.img_size), task.model.mask_sampler)
        self.batch = collate([images[(i, cfg.train.seed + i)] for i in idx])

    def draw(self, engine: Engine, epoch: int, name: str | None = None) -> None:
        model, device = self.task.model, self.task.device
        imgs, ids = self.batch["images"].to(device), self.batch["ids_shuffle"].to(device)
        rec = reconstruct(model, imgs, ids, pred_ratio=self.task.mask_ratio)
        psnr = float(masked_psnr(rec["pred"], rec["original"], rec["predicted"],
                                 model.patch_size).mean())  # fmt: skip
        engine.record({"step": engine.step, "epoch": epoch, "recon_psnr": psnr}, "recon")
        norm = ("; norm-pix outputs shown with each patch's true mean and spread"
                if model.norm_pix_loss else "")  # fmt: skip
        when = "untrained" if engine.step == 0 else f"epoch {epoch}  step {engine.step}"
        title = (f"{self.task.cfg.model.name}  {when}  masked-patch PSNR {psnr:.2f} dB\n"
                 f"(every masked patch decoded{norm})")  # fmt: skip
        (self.out / "recon").mkdir(exist_ok=True)
        name = name or f"epoch-{epoch:04d}.png"
        save_reconstruction_grid(rec, self.out / "recon" / name, title)
        save_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png", lr=engine.schedule)

    def before_train(self, engine: Engine) -> None:
        if engine.rank == 0 and engine.step == 0 and self.task.cfg.log.vis_every_epochs:
            self.draw(engine, 0)  # the untrained model: what every later figure is read against

    def after_epoch(self, engine: Engine) -> None:
        every = self.task.cfg.log.vis_every_epochs
        epoch = engine.step // engine.steps_per_epoch
        if engine.rank == 0 and every and epoch % every == 0:
            self.draw(engine, epoch)

    def after_train(self, engine: Engine, interrupted: bool) -> None:
        if engine.rank == 0 and not interrupted and engine.step % engine.steps_per_epoch:
            epoch = engine.step // engine.steps_per_epoch  # stopped mid-epoch: its own file
            self.draw(engine, epoch, f"epoch-{epoch:04d}-step-{engine.step}.png")


def pretrain(cfg, *, resume: str | None = None) -> dict:
    """Pretrain per ``cfg`` (a ``config.PretrainConfig``): ``run_task`` of ``PretrainTask``."""
    from .runner import run_task

    return run_task(PretrainTask(cfg), cfg, resume)
