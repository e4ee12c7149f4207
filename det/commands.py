"""The command line of ``crossmae det`` beside its training (``det.task``): evaluate, visualize and
import checkpoints, and the encoder converter into the reference framework's layout."""

from __future__ import annotations

import argparse

import torch

from crossmae.checks import fraction_option, int_at_least
from crossmae.models.pretrained import load_pretrained_encoder
from crossmae.task import register_command, register_converter, register_group

from . import task
from .config import DetConfig
from .data import CocoInstances
from .evaluate import evaluate_detector, report
from .model import DET_FORMAT, build_detector

register_group(("det",), "ViTDet Mask R-CNN on COCO-format data", task.__doc__)


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
    metrics = evaluate_detector(model.to(device), dataset, precision=args.precision,
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
    p.add_argument("--score", type=fraction_option, default=0.5,
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


@register_converter("to-mae", "encoder -> MAE release format (what detectron2's ViTDet loads)")
def to_mae(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic

    from .d2 import d2_init_checkpoint

    check_output(args.src, args.dest, force=args.force)
    sd, config = load_pretrained_encoder(args.src, official_arch=args.official_arch)
    out, note = d2_init_checkpoint(sd, config)
    save_atomic(out, args.dest)
    print(f"wrote {args.dest}: {note} (detectron2 ViTDet's train.init_checkpoint)")
    return 0
