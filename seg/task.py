"""UperNet semantic segmentation as a task (``crossmae seg train``), trained as mmsegmentation
1.2.2's MAE UperNet config trains it (the ``SegConfig`` defaults): AdamW lr 1e-4, wd 0.05, layer
decay 0.65, LinearLR warmup over 1500 steps then PolyLR, batch 16 of 512 crops, SyncBN when
distributed, cross entropy divided by all pixels, auxiliary FCN loss x 0.4, fp16 AMP; mIoU by
sliding-window inference in full precision. Also ``crossmae seg evaluate`` (mmseg's per-class
table), ``seg visualize`` (predictions beside the ground truth, PNGs), ``seg import-mmseg`` and
``convert to-mmseg``.

    torchrun --nproc-per-node 8 -m crossmae seg train \\
        --config configs/seg/upernet_vit_base_ade20k_160k.yaml data.root=/data/ADEChallengeData \\
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/seg_b
    crossmae seg evaluate runs/seg_b/checkpoint-last.pt data.root=/data/ADEChallengeData2016
    crossmae seg visualize runs/seg_b/checkpoint-last.pt data.root=/data/ADEChallengeData2016 \
        --out PNGS
    crossmae seg import-mmseg upernet_mae-base_ade20k.pth upernet_b.pt [key=value ...]

The encoder as mmseg's MAE backbone loads it (model.pretrained): crossmae convert to-mmseg.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from crossmae import distributed as du
from crossmae.checkpoint import write_text_atomic
from crossmae.commands.convert import converter
from crossmae.config import ConfigError, int_at_least, load_config, without_missing
from crossmae.engine import check_precision
from crossmae.models.pretrained import (
    describe_source,
    encoder_of,
    load_pretrained_encoder,
    model_on_encoder,
)
from crossmae.task import (
    BenchCase,
    Task,
    TransferStage,
    bench_encoder,
    register_command,
    register_group,
    register_task,
)

from .config import SegConfig
from .data import SegAugment, SegFolder, label_spec
from .evaluate import eval_settings, evaluate_segmenter
from .metrics import format_table
from .model import (
    SEG_FORMAT,
    build_segmenter,
    segmentation_losses,
    slide_inference,
    to_sync_batchnorm,
)

log = logging.getLogger("crossmae")
register_group(("seg",), "UperNet semantic segmentation", __doc__)


@register_task
class SegTask(Task):
    """UperNet training and mIoU evaluation (module docstring)."""

    name = "seg"
    command = ("seg", "train")
    help = "train UperNet (mIoU at the end)"
    schema = SegConfig
    format = SEG_FORMAT
    curve = {"mIoU": "mIoU", "aAcc": "pixel accuracy"}
    transfer = TransferStage("seg", 4, "configs/seg/upernet_vit_{size}_ade20k_160k.yaml",
                             {"ADE20K": ("data.root={root}",)},
                             (("ADE20K mIoU", ("miou",)),),
                             cpu_config="configs/seg/upernet_camvid_small.yaml")  # fmt: skip

    def open_data(self) -> None:
        check_precision(self.cfg.eval.precision, "eval.precision")
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

    def losses(self, forward, imgs: torch.Tensor, labels: torch.Tensor) -> dict:
        m = self.cfg.model
        parts = segmentation_losses(forward(imgs), labels, aux_weight=m.aux_weight,
                                    avg_non_ignore=m.loss_avg_non_ignore)  # fmt: skip
        return {**parts, "loss": parts["decode_loss_ce"] + parts["aux_loss_ce"]}

    def eval_every(self) -> tuple[int, int]:
        return (self.cfg.eval.every_steps, 0)

    def evaluate(self, step: int) -> dict:
        return evaluate_segmenter(self.model, self.val_folder, self.spec.num_classes,
                                  **eval_settings(self.cfg))  # fmt: skip

    def describe(self, metrics: dict) -> str:
        return f"mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f}"

    def report(self, metrics: dict) -> str:
        return format_table(metrics)

    def state(self) -> dict:
        return {"encoder_config": self.encoder_config, "num_classes": self.spec.num_classes}

    def finish(self, result: dict) -> None:
        table = format_table(result["metrics"])
        write_text_atomic(Path(result["output_dir"]) / "per_class.md", table + "\n")

    @classmethod
    def headline(cls, result: dict) -> dict:
        m = result["metrics"]
        return {"miou": m["mIoU"], "macc": m["mAcc"], "aacc": m["aAcc"]}

    @classmethod
    def smoke_settings(cls, shared: Path, scratch: Path) -> tuple[str, list[str]]:
        """The 3 ADE20K samples for training and evaluation, 64-px crops, 2 steps."""
        return ("configs/seg/upernet_vit_base_ade20k_160k.yaml",
                [f"data.root={shared / 'data' / 'ade20k_samples'}", "data.train_split=validation",
                 "data.val_split=validation", "data.crop=64", "data.scale=[128,64]",
                 "eval.stride=43", "model.channels=16", "train.steps=2", "train.batch_size=2",
                 "optim.warmup_steps=1"])  # fmt: skip

    @classmethod
    def benchmark_case(cls, tiny: bool, batch: int | None, device: torch.device) -> BenchCase:
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
        return BenchCase(cls(cfg), model, (imgs, labels), batch, cfg.train.precision,
                         lambda: slide_inference(model, image, 150, crop=crop,
                                                 stride=crop * 2 // 3))  # fmt: skip


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


# ----------------------------------------------------------------------------- other commands
@register_command(("seg", "evaluate"), help="mIoU of a trained or imported segmenter")
def _evaluate_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.root=DIR, data.val_split=..., eval.*")  # fmt: skip
    p.set_defaults(func=evaluate_checkpoint)


def load_segmenter(checkpoint: str, overrides: list[str]) -> tuple:
    """A trained or imported segmenter, its config (the checkpoint's, ``key=value`` over it)
    and the validation folder it is scored on (same number of classes)."""
    from crossmae.checkpoint import load_checkpoint, load_state_dict_strict

    ck = load_checkpoint(checkpoint, expect=SEG_FORMAT)
    cfg = load_config(SegConfig, [], overrides, base=without_missing(ck["config"]))
    spec = label_spec(cfg.data)
    if spec.num_classes != ck["num_classes"]:
        raise ValueError(
            f"the dataset has {spec.num_classes} classes, the model {ck['num_classes']}"
        )
    model = build_segmenter(cfg, ck["num_classes"], ck["encoder_config"])
    load_state_dict_strict(model, ck["model"], what=str(checkpoint))
    return model, cfg, SegFolder(cfg.data.root, cfg.data.val_split, spec)


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    """A trained or imported segmenter on a dataset; ``key=value`` sets the dataset (root,
    val_split, dataset, ...) and evaluation settings over the checkpoint's config."""
    from crossmae.checkpoint import strict_json

    model, cfg, folder = load_segmenter(args.checkpoint, args.overrides)
    device = du.init_from_env(cfg.train.device)
    m = evaluate_segmenter(model.to(device), folder, folder.spec.num_classes,
                           **eval_settings(cfg))  # fmt: skip
    if du.is_main():
        print(format_table(m))
        print(strict_json({k: m[k] for k in ("mIoU", "mAcc", "aAcc")}))
    return 0


@register_command(("seg", "visualize"), help="draw a segmenter's predictions beside the ground "
                  "truth (PNGs)")  # fmt: skip
def _visualize_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.root=DIR, data.val_split=..., eval.*")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the PNGs (one per image)")
    p.add_argument("-n", "--num-images", type=int_at_least(1), default=4,
                   help="the first N images of the split (default 4)")  # fmt: skip
    p.set_defaults(func=visualize_checkpoint)


def visualize_checkpoint(args: argparse.Namespace) -> int:
    from .visualize import visualize_segmentation

    model, cfg, folder = load_segmenter(args.checkpoint, args.overrides)
    model.to("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    files = visualize_segmentation(model, folder, args.out, images=args.num_images,
                                   **eval_settings(cfg))  # fmt: skip
    print(f"wrote {len(files)} PNGs to {args.out}: image | ground truth | prediction")
    return 0


@register_command(("seg", "import-mmseg"), help="mmseg MAE UperNet checkpoint -> ours")
def _import_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model.out_indices=[3,5,7,11]")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace OUTPUT even if it is a "
                   "checkpoint of another kind")  # fmt: skip
    p.set_defaults(func=import_checkpoint)


def import_checkpoint(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic
    from crossmae.config import parse_settings

    from .export import import_mmseg

    check_output(args.checkpoint, args.output, writes=SEG_FORMAT, force=args.force)
    ck = import_mmseg(args.checkpoint, parse_settings(args.overrides))
    save_atomic(ck, args.output)
    enc = ck["encoder_config"]
    print(f"wrote {args.output}: ViT {enc['embed_dim']}-d x {enc['depth']}, "
          f"{ck['num_classes']} classes; score it with crossmae seg evaluate {args.output} "
          "data.root=DIR")  # fmt: skip
    return 0


@converter("to-mmseg", "encoder -> mmsegmentation MAE backbone")
def to_mmseg_file(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic

    from .export import to_mmseg

    check_output(args.src, args.dest, force=args.force)
    sd, _ = load_pretrained_encoder(args.src, official_arch=args.official_arch)
    save_atomic(to_mmseg(sd), args.dest)
    print(f"wrote {args.dest}: mmseg MAE backbone layout (layers.*, loaded with mmseg's "
          f"--cfg-options model.pretrained={args.dest})")  # fmt: skip
    return 0
