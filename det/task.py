"""ViTDet Mask R-CNN on COCO-format data as a task (``crossmae det train``), with detectron2's
ViTDet recipe (the ``DetConfig`` defaults): AdamW (lr 1e-4, betas 0.9 / 0.999, weight decay 0.1
on everything but the ViT's LayerNorms and position table), layer-wise lr decay over the ViT,
250-iteration linear warmup from 0.1 %, x0.1 at each milestone, fp16 autocast with gradient
scaling, large-scale jitter; COCO box / mask AP at the end (and every ``eval.every_steps``), in
full precision. Also ``crossmae det evaluate`` (COCOeval's summary and the per-category AP
table), ``det visualize`` (predictions beside the ground truth, PNGs), ``det import-d2`` and
``convert to-mae``.

    torchrun --nproc-per-node 8 -m crossmae det train \\
        --config configs/det/mask_rcnn_vit_base_100ep.yaml data.train_json=... \\
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/det_b
    crossmae det evaluate runs/det_b/checkpoint-last.pt --json ANN.json --images DIR
    crossmae det visualize runs/det_b/checkpoint-last.pt --json ANN.json --images DIR --out PNGS
    crossmae det import-d2 model_final.pkl vitdet_b.pt [--json ANN.json]

The encoder as detectron2's ViTDet loads it (train.init_checkpoint): crossmae convert to-mae.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch

from crossmae.commands.convert import converter
from crossmae.config import int_at_least, load_config
from crossmae.engine import PRECISIONS, check_precision
from crossmae.models.pretrained import load_pretrained_encoder, model_on_encoder
from crossmae.task import (
    BenchCase,
    Task,
    TransferStage,
    bench_encoder,
    register_command,
    register_group,
    register_task,
)

from .config import DetConfig
from .data import CocoInstances, coco_subset, collate_detection
from .evaluate import NO_DETECTIONS, evaluate_detector, report
from .model import DET_FORMAT, Targets, build_detector

log = logging.getLogger("crossmae")
PLAN_INSTANCES = 100  # ground-truth objects per image the memory planner assumes (a crowded image)


class PlannedData(list):
    """What the memory planner builds the detector for in place of a dataset: COCO's 80 classes."""

    num_classes = 80
    dropped: dict[str, int] = {}


register_group(("det",), "ViTDet Mask R-CNN on COCO-format data", __doc__)
COCO = {"COCO": ("data.train_json={root}/annotations/instances_train2017.json",
                 "data.train_images={root}/train2017",
                 "data.val_json={root}/annotations/instances_val2017.json",
                 "data.val_images={root}/val2017")}  # fmt: skip


@register_task
class DetTask(Task):
    """ViTDet Mask R-CNN training and COCO evaluation (module docstring)."""

    name = "det"
    command = ("det", "train")
    help = "train ViTDet Mask R-CNN (COCO AP at the end)"
    schema = DetConfig
    format = DET_FORMAT
    curve = {"bbox/AP": "box AP", "segm/AP": "mask AP"}
    transfer = TransferStage("det", 3, "configs/det/mask_rcnn_vit_{size}_*ep.yaml", COCO,
                             (("COCO AP box / AP mask", ("ap_box", "ap_mask")),),
                             cpu_config="configs/det/mask_rcnn_coco128_small.yaml")  # fmt: skip

    def open_data(self) -> None:
        check_precision(self.cfg.eval.precision, "eval.precision")
        d, size = self.cfg.data, self.cfg.model.img_size
        ids = None if d.image_ids is None else list(d.image_ids)
        self.train_data = CocoInstances(d.train_json, d.train_images, train=True, img_size=size,
                                        scale_range=d.scale_range, image_ids=ids)  # fmt: skip
        self.val_data = CocoInstances(d.val_json, d.val_images, train=False, img_size=size,
                                      image_ids=ids)  # fmt: skip

    def engine_options(self) -> dict:
        return {"ddp_fp16_compression": self.cfg.train.ddp_fp16_compression}

    # ------------------------------------------------------------------ memory planning
    def plan_data(self) -> None:
        self.train_data = self.val_data = PlannedData()

    def example_batch(self, batch: int, training: bool = True):
        """Images at the training size; each with ``PLAN_INSTANCES`` ground-truth objects."""
        size = self.cfg.model.img_size
        imgs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(batch)]
        if not training:
            return imgs, None
        square = np.array([0.0, 0.0, 64.0, 0.0, 64.0, 64.0, 0.0, 64.0])
        targets = [Targets(torch.rand(PLAN_INSTANCES, 4) * size,
                           torch.randint(0, PlannedData.num_classes, (PLAN_INSTANCES,)),
                           [[square.copy()] for _ in range(PLAN_INSTANCES)])
                   for _ in range(batch)]  # fmt: skip
        return imgs, targets

    def plan_evaluation(self, model, batch, device):
        return model([im.to(device) for im in batch[0]])

    def build_model(self, device: torch.device) -> torch.nn.Module:
        torch.set_float32_matmul_precision("high")
        classes = self.train_data.num_classes
        model, self.encoder_config = model_on_encoder(
            self.cfg.encoder, lambda enc: build_detector(self.cfg.model, classes, enc),
            lambda m: m.backbone.net,
        )  # fmt: skip
        log.info("ViTDet Mask R-CNN: %d classes, %d training images; instances left out: %s",
                 classes, len(self.train_data),
                 ", ".join(f"{n} {why}" for why, n in self.train_data.dropped.items()))  # fmt: skip
        return model.to(device)

    def train_set(self):
        return self.train_data

    def collate_fn(self):
        return collate_detection

    def inputs(self, batch, device: torch.device) -> dict:
        imgs, targets = batch
        return {"imgs": [im.to(device, non_blocking=True) for im in imgs],
                "targets": [t.to(device) for t in targets]}  # fmt: skip

    def losses(self, forward, imgs: list, targets: list) -> dict:
        parts = forward(imgs, targets)
        return {**parts, "loss": sum(parts.values())}

    def eval_every(self) -> tuple[int, int]:
        return (self.cfg.eval.every_steps, 0)

    def evaluate(self, step: int) -> dict:
        e = self.cfg.eval
        results = Path(self.cfg.output_dir) / f"coco_results-{step}.json"
        return evaluate_detector(
            self.model,
            self.val_data,
            self.device,
            batch_size=e.batch_size,
            precision=PRECISIONS[e.precision],
            results_file=results,
        )

    def describe(self, metrics: dict) -> str:
        if not metrics.get("detections"):
            return NO_DETECTIONS
        return (f"box AP {metrics['bbox']['AP']:.2f}, mask AP {metrics['segm']['AP']:.2f} "
                f"({metrics['detections']} detections)")  # fmt: skip

    def report(self, metrics: dict) -> str:
        return report(metrics)

    def state(self) -> dict:
        return {"categories": self.train_data.cat_ids, "num_classes": self.train_data.num_classes,
                "encoder_config": self.encoder_config}  # fmt: skip

    @classmethod
    def headline(cls, result: dict) -> dict:
        """Box / mask AP; null when undefined (no detection at all: detectron2's NaN), with
        the reason as ``note``."""
        m = result["metrics"]
        ap = {"ap_box": m["bbox"]["AP"], "ap_mask": m["segm"]["AP"]}
        out = {k: None if v is None or math.isnan(v) else v for k, v in ap.items()}
        if not m.get("detections"):
            out["note"] = NO_DETECTIONS
        return out

    @classmethod
    def smoke_settings(cls, shared: Path, scratch: Path) -> tuple[str, list[str]]:
        """The first 4 coco128 images, 128 px, 2 steps."""
        coco = shared / "data" / "coco128"
        (scratch / "det").mkdir(parents=True, exist_ok=True)
        small = coco_subset(coco / "annotations" / "instances_train2017.json",
                            scratch / "det" / "small.json", 4)  # fmt: skip
        images = coco / "train2017"
        return ("configs/det/mask_rcnn_coco128_small.yaml",
                [f"data.train_json={small}", f"data.train_images={images}",
                 f"data.val_json={small}", f"data.val_images={images}", "model.img_size=128",
                 "model.window=4", "train.steps=2", "train.batch_size=2",
                 "optim.warmup_steps=1"])  # fmt: skip

    @classmethod
    def benchmark_case(cls, tiny: bool, batch: int | None, device: torch.device) -> BenchCase:
        """ViTDet-B Mask R-CNN at 1024 px, 2 images per GPU, fp16 (tiny: 64 px, 16-wide heads)."""
        size, batch = (64 if tiny else 1024), batch or 2
        heads = [f"model.heads.{k}={v}" for k, v in (("pyramid_channels", 16),
                 ("box_conv_dims", "[16]"), ("box_fc_dims", "[16]"), ("mask_conv_dims", "[16]"),
                 ("mask_deconv_dim", 16))] if tiny else []  # fmt: skip
        cfg = load_config(DetConfig, [], [f"model.img_size={size}",
                                          f"model.window={2 if tiny else 14}", *heads])  # fmt: skip
        model = build_detector(cfg.model, 80, bench_encoder(tiny)).to(device)
        g = torch.Generator().manual_seed(0)
        imgs = [torch.randint(0, 256, (3, size, size * 3 // 4), generator=g, dtype=torch.uint8)
                .to(device) for _ in range(batch)]  # fmt: skip
        boxes = torch.tensor([[10.0, 12.0, size / 2, size / 3],
                              [size / 4, size / 5, size * 0.6, size * 0.7]])  # fmt: skip
        polys = [[np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]
                 for x0, y0, x1, y1 in boxes.tolist()]  # fmt: skip
        targets = [Targets(boxes, torch.tensor([3, 7]), polys) for _ in range(batch)]
        return BenchCase(cls(cfg), model, (imgs, targets), batch, cfg.train.precision,
                         lambda: model(imgs[:1]))  # fmt: skip


# ----------------------------------------------------------------------------- other commands
@register_command(("det", "evaluate"), help="COCO box / mask AP of a trained or imported detector")
def _evaluate_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True, help="COCO instances annotation file")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--results", default=None, help="write the COCO results json here")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast during evaluation (detectron2: fp32)")  # fmt: skip
    p.set_defaults(func=evaluate_checkpoint)


def load_detector(checkpoint: str, annotations: str, images: str) -> tuple:
    """A trained or imported detector and the COCO dataset it is scored on (same categories)."""
    from omegaconf import OmegaConf

    from crossmae.checkpoint import load_checkpoint, load_state_dict_strict

    ck = load_checkpoint(checkpoint, expect=DET_FORMAT)
    cfg = OmegaConf.merge(OmegaConf.structured(DetConfig), ck["config"])
    dataset = CocoInstances(annotations, images, train=False, img_size=cfg.model.img_size)
    if ck["categories"] is None:  # imported: detectron2 maps sorted category ids to classes too
        if dataset.num_classes != ck["num_classes"]:
            raise ValueError(f"{annotations} has {dataset.num_classes} categories, the detector "
                             f"{ck['num_classes']} classes")  # fmt: skip
    elif dataset.cat_ids != ck["categories"]:
        raise ValueError(f"{annotations} has other categories than the checkpoint was trained on")
    model = build_detector(cfg.model, ck["num_classes"], ck["encoder_config"])
    load_state_dict_strict(model, ck["model"], what=str(checkpoint))
    torch.set_float32_matmul_precision("high")
    return model, dataset


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    from crossmae import distributed as du
    from crossmae.checkpoint import strict_json

    model, dataset = load_detector(args.checkpoint, args.json, args.images)
    device = du.init_from_env()
    metrics = evaluate_detector(model.to(device), dataset, device,
                                precision=PRECISIONS[args.precision],
                                results_file=args.results)  # fmt: skip
    if du.is_main():
        print(report(metrics))
        print(strict_json({k: metrics[k] for k in ("bbox", "segm", "detections")}))
    return 0


@register_command(("det", "visualize"), help="draw a detector's predictions beside the ground "
                  "truth (PNGs)")  # fmt: skip
def _visualize_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True, help="COCO instances annotation file")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--out", required=True, help="folder for the PNGs (one per image)")
    p.add_argument("-n", "--num-images", type=int_at_least(1), default=8,
                   help="the first N images of the json (default 8)")  # fmt: skip
    p.add_argument("--score", type=float, default=0.5,
                   help="draw predictions scored at least this (default 0.5)")  # fmt: skip
    p.set_defaults(func=visualize_checkpoint)


def visualize_checkpoint(args: argparse.Namespace) -> int:
    from .visualize import visualize_detections

    model, dataset = load_detector(args.checkpoint, args.json, args.images)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    files = visualize_detections(model, dataset, args.out, images=args.num_images,
                                 score=args.score)  # fmt: skip
    print(f"wrote {len(files)} PNGs to {args.out}: ground truth | predictions")
    return 0


@register_command(("det", "import-d2"), help="detectron2 ViTDet Mask R-CNN (.pth / .pkl) -> ours")
def _import_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--json", default=None, help="the COCO json whose categories are its classes")
    p.add_argument("--force", action="store_true", help="replace OUTPUT even if it is a "
                   "checkpoint of another kind")  # fmt: skip
    p.set_defaults(func=import_checkpoint)


def import_checkpoint(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic

    from .d2 import import_d2

    check_output(args.checkpoint, args.output, writes=DET_FORMAT, force=args.force)
    ck = import_d2(args.checkpoint, annotations=args.json)
    save_atomic(ck, args.output)
    arch = ck["encoder_config"]
    print(f"wrote {args.output}: ViT {arch['embed_dim']}-d x {arch['depth']}, "
          f"{ck['num_classes']} classes, {len(ck['model'])} tensors; score it with "
          f"crossmae det evaluate {args.output} --json ANN.json --images DIR")  # fmt: skip
    return 0


@converter("to-mae", "encoder -> MAE release format (what detectron2's ViTDet loads)")
def to_mae(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic

    from .d2 import d2_init_checkpoint

    check_output(args.src, args.dest, force=args.force)
    sd, config = load_pretrained_encoder(args.src, official_arch=args.official_arch)
    out, note = d2_init_checkpoint(sd, config)
    save_atomic(out, args.dest)
    print(f"wrote {args.dest}: {note} (detectron2 ViTDet's train.init_checkpoint)")
    return 0
