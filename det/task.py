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

import logging
import math
from pathlib import Path

import numpy as np
import torch

from crossmae.bench import BenchCase, bench_encoder, register_bench_case
from crossmae.config import load_config
from crossmae.evaluation import Evaluation
from crossmae.models.pretrained import model_on_encoder
from crossmae.task import Task, TransferStage, register_task

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


COCO = {"COCO": ("data.train_json={root}/annotations/instances_train2017.json",
                 "data.train_images={root}/train2017",
                 "data.val_json={root}/annotations/instances_val2017.json",
                 "data.val_images={root}/val2017")}  # fmt: skip


def coco_headline(result: dict) -> dict:
    """Box / mask AP; null when undefined (no detection at all: detectron2's NaN), with
    the reason as ``note``."""
    m = result["metrics"]
    ap = {"ap_box": m["bbox"]["AP"], "ap_mask": m["segm"]["AP"]}
    out = {k: None if v is None or math.isnan(v) else v for k, v in ap.items()}
    if not m.get("detections"):
        out["note"] = NO_DETECTIONS
    return out


def coco128_smoke(shared: Path, scratch: Path) -> tuple[str, list[str]]:
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


@register_task
class DetTask(Task):
    """ViTDet Mask R-CNN training and COCO evaluation (module docstring)."""

    name = "det"
    command = ("det", "train")
    help = "train ViTDet Mask R-CNN (COCO AP at the end)"
    schema = DetConfig
    format = DET_FORMAT
    transfer = TransferStage("det", 3, "configs/det/mask_rcnn_vit_{size}_*ep.yaml", COCO,
                             (("COCO AP box / AP mask", ("ap_box", "ap_mask")),),
                             cpu_config="configs/det/mask_rcnn_coco128_small.yaml",
                             headline=coco_headline, smoke=coco128_smoke)  # fmt: skip

    def open_data(self) -> None:
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

    def losses(self, model, imgs: list, targets: list) -> dict:
        parts = model(imgs, targets)
        return {**parts, "loss": sum(parts.values())}

    def evaluation(self) -> Evaluation:
        return Evaluation(self._evaluate, every_steps=self.cfg.eval.every_steps,
                          line=self._line, tables=report,
                          curve={"bbox/AP": "box AP", "segm/AP": "mask AP"})  # fmt: skip

    def _evaluate(self, step: int) -> dict:
        e = self.cfg.eval
        results = Path(self.cfg.output_dir) / f"coco_results-{step}.json"
        return evaluate_detector(self.model, self.val_data, batch_size=e.batch_size,
                                 precision=e.precision, results_file=results)  # fmt: skip

    @staticmethod
    def _line(metrics: dict) -> str:
        if not metrics.get("detections"):
            return NO_DETECTIONS
        return (f"box AP {metrics['bbox']['AP']:.2f}, mask AP {metrics['segm']['AP']:.2f} "
                f"({metrics['detections']} detections)")  # fmt: skip

    def checkpoint_fields(self) -> dict:
        return {"categories": self.train_data.cat_ids, "num_classes": self.train_data.num_classes,
                "encoder_config": self.encoder_config}  # fmt: skip


@register_bench_case("det")
def det_bench_case(tiny: bool, batch: int | None, device: torch.device) -> BenchCase:
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
    return BenchCase(DetTask(cfg), model, (imgs, targets), batch, cfg.train.precision,
                     lambda: model(imgs[:1]))  # fmt: skip
