"""UperNet semantic segmentation as a task (``crossmae seg train``), trained as mmsegmentation
1.2.2's MAE UperNet config trains it (the ``SegConfig`` defaults): AdamW lr 1e-4, wd 0.05, layer
decay 0.65, LinearLR warmup over 1500 steps then PolyLR, batch 16 of 512 crops, SyncBN when
distributed, cross entropy divided by all pixels, auxiliary FCN loss x 0.4, fp16 AMP; mIoU by
sliding-window inference in full precision. Also ``crossmae seg evaluate`` (mmseg's per-class
table), ``seg visualize`` (predictions beside the ground truth, PNGs), ``seg import-mmseg`` and
``convert to-mmseg``.

    torchrun --nproc-per-node 8 -m crossmae seg train \\
        --config configs/seg/upernet_vit_base_ade20k_160k.yaml \\
        data.root=/data/ADEChallengeData2016 \\
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/seg_b
    crossmae seg evaluate runs/seg_b/checkpoint-last.pt data.root=/data/ADEChallengeData2016
    crossmae seg visualize runs/seg_b/checkpoint-last.pt data.root=/data/ADEChallengeData2016 \\
        --out PNGS
    crossmae seg import-mmseg upernet_mae-base_ade20k.pth upernet_b.pt [key=value ...]

The encoder as mmseg's MAE backbone loads it (model.pretrained): crossmae convert to-mmseg.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from crossmae import distributed as du
from crossmae.bench import BenchCase, bench_encoder, register_bench_case
from crossmae.checkpoint import write_text_atomic
from crossmae.config import ConfigError, load_config
from crossmae.distributed import to_sync_batchnorm
from crossmae.evaluation import Evaluation
from crossmae.models.pretrained import describe_source, encoder_of, model_on_encoder
from crossmae.task import Task, TransferStage, register_task

from .config import SegConfig
from .data import SegAugment, SegFolder, label_spec
from .evaluate import eval_settings, evaluate_segmenter, slide_inference
from .metrics import format_table
from .model import SEG_FORMAT, build_segmenter, segmentation_losses

log = logging.getLogger("crossmae")


def miou_headline(result: dict) -> dict:
    m = result["metrics"]
    return {"miou": m["mIoU"], "macc": m["mAcc"], "aacc": m["aAcc"]}


def ade20k_samples_smoke(shared: Path, scratch: Path) -> tuple[str, list[str]]:
    """The 3 ADE20K samples for training and evaluation, 64-px crops, 2 steps."""
    return ("configs/seg/upernet_vit_base_ade20k_160k.yaml",
            [f"data.root={shared / 'data' / 'ade20k_samples'}", "data.train_split=validation",
             "data.val_split=validation", "data.crop=64", "data.scale=[128,64]",
             "eval.stride=43", "model.channels=16", "train.steps=2", "train.batch_size=2",
             "optim.warmup_steps=1"])  # fmt: skip


@register_task
class SegTask(Task):
    """UperNet training and mIoU evaluation (module docstring)."""

    name = "seg"
    command = ("seg", "train")
    help = "train UperNet (mIoU at the end)"
    schema = SegConfig
    format = SEG_FORMAT
    transfer = TransferStage("seg", 4, "configs/seg/upernet_vit_{size}_ade20k_160k.yaml",
                             {"ADE20K": ("data.root={root}",)},
                             (("ADE20K mIoU", ("miou",)),),
                             cpu_config="configs/seg/upernet_camvid_small.yaml",
                             headline=miou_headline, smoke=ade20k_samples_smoke)  # fmt: skip

    def open_data(self) -> None:
        d = self.cfg.data
        check_crop(d.crop, tuple(d.scale), max(d.ratio_range))
        self.spec = label_spec(d)
        names = None if d.images is None else list(d.images)
        self.train_folder = SegFolder(d.root, d.train_split, self.spec, skip_unreadable=True,
                                      names=names)  # fmt: skip
        self.val_folder = SegFolder(d.root, d.val_split, self.spec, names=names)
        e = self.cfg.encoder  # read now: its depth must hold model.out_indices
        self.encoder = encoder_of(e)
        depth, blocks = self.encoder[1]["depth"], self.cfg.model.out_indices
        if blocks is not None and max(blocks) >= depth:
            raise ConfigError(f"model.out_indices={list(blocks)} needs an encoder of at least "
                              f"{max(blocks) + 1} blocks; {describe_source(e)} has "
                              f"{depth}")  # fmt: skip

    def plan_data(self) -> None:
        self.spec = label_spec(self.cfg.data)
        self.encoder = encoder_of(self.cfg.encoder)
        self.train_folder = self.val_folder = []

    def example_batch(self, batch: int, training: bool = True):
        c = self.cfg.data.crop
        return (torch.randn(batch, 3, c, c),
                torch.randint(0, self.spec.num_classes, (batch, c, c)))  # fmt: skip

    def plan_evaluation(self, model, batch, device):  # one sliding window at a time
        return model(batch[0][:1].to(device))

    def build_model(self, device: torch.device) -> torch.nn.Module:
        classes = self.spec.num_classes
        model, self.encoder_config = model_on_encoder(
            self.cfg.encoder, lambda enc: build_segmenter(self.cfg, classes, enc),
            lambda m: m.backbone, self.encoder,
        )  # fmt: skip
        if du.world_size() > 1:  # mmseg's SyncBN: batch statistics over every process's crops
            model = to_sync_batchnorm(model, device)
        log.info("UperNet: %d classes, %d training images", classes, len(self.train_folder))
        return model.to(device)

    def train_set(self):
        d = self.cfg.data
        return SegAugment(self.train_folder, d.crop, tuple(d.scale), tuple(d.ratio_range),
                          d.cat_max_ratio)  # fmt: skip

    def inputs(self, batch, device: torch.device) -> dict:
        imgs, labels = batch
        return {"imgs": imgs.to(device, non_blocking=True),
                "labels": labels.to(device, non_blocking=True)}  # fmt: skip

    def losses(self, model, imgs: torch.Tensor, labels: torch.Tensor) -> dict:
        m = self.cfg.model
        parts = segmentation_losses(model(imgs), labels, aux_weight=m.aux_weight,
                                    avg_non_ignore=m.loss_avg_non_ignore)  # fmt: skip
        return {**parts, "loss": parts["decode_loss_ce"] + parts["aux_loss_ce"]}

    def evaluation(self) -> Evaluation:
        return Evaluation(self._evaluate, every_steps=self.cfg.eval.every_steps,
                          line=self._line, tables=format_table,
                          curve={"mIoU": "mIoU", "aAcc": "pixel accuracy"})  # fmt: skip

    def _evaluate(self, step: int) -> dict:
        return evaluate_segmenter(self.model, self.val_folder, self.spec.num_classes,
                                  **eval_settings(self.cfg))  # fmt: skip

    @staticmethod
    def _line(metrics: dict) -> str:
        return f"mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f}"

    def checkpoint_fields(self) -> dict:
        return {"encoder_config": self.encoder_config, "num_classes": self.spec.num_classes}

    def after_run(self, result: dict) -> None:
        table = format_table(result["metrics"])
        write_text_atomic(Path(result["output_dir"]) / "per_class.md", table + "\n")


def check_crop(crop: int, scale: tuple[int, int], ratio: float) -> None:
    """A training crop beyond what the rescaling can give: refused when larger than the longest
    side any rescaled image can have (every crop mostly padding), a warning when larger than the
    shortest side's largest value (every crop padded)."""
    long, short = max(scale) * ratio, min(scale) * ratio
    if crop > long:
        raise ConfigError(
            f"data.crop={crop} is larger than any image after rescaling (at most {long:.0f} x "
            f"{short:.0f}: data.scale={list(scale)} x {ratio}, the largest of "
            "data.ratio_range): every crop would be mostly padding"
        )
    if crop > short:
        log.warning("data.crop=%d is larger than the short side of every rescaled image (at most "
                    "%.0f): every crop is padded", crop, short)  # fmt: skip


@register_bench_case("seg")
def seg_bench_case(tiny: bool, batch: int | None, device: torch.device) -> BenchCase:
    """UperNet-B on 512-px crops, 2 per GPU, fp16; evaluation: one 512 x 683 image by
    sliding windows, as ADE20K's test images are scaled (tiny: 32 px, 16-wide heads)."""
    crop, batch = (32 if tiny else 512), batch or 2
    widths = ["model.channels=16", "model.aux_channels=8"] if tiny else []
    cfg = load_config(SegConfig, [], [f"data.crop={crop}", *widths])
    model = build_segmenter(cfg, 150, bench_encoder(tiny)).to(device)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    labels = torch.randint(0, 150, (batch, crop, crop), generator=g).to(device)
    image = torch.randn(1, 3, crop, crop * 4 // 3, generator=g).to(device)
    return BenchCase(SegTask(cfg), model, (imgs, labels), batch, cfg.train.precision,
                     lambda: slide_inference(model, image, 150, crop=crop,
                                             stride=crop * 2 // 3))  # fmt: skip
