"""``crossmae det train|evaluate|import-d2``: ViTDet Mask R-CNN on COCO-format data.

crossmae det train --config configs/det/mask_rcnn_vit_base_100ep.yaml key=value ...
crossmae det evaluate runs/det_b/checkpoint-last.pt --json ANN.json --images DIR
crossmae det import-d2 model_final.pkl vitdet_b.pt [--json ANN.json]

The encoder as detectron2's ViTDet loads it (train.init_checkpoint): crossmae convert to-mae.
"""

from __future__ import annotations

import argparse
import json

import torch

from crossmae.cli import add_training_command
from crossmae.config import load_config

from .config import DetConfig


def _train(args) -> int:
    from .config import DetConfig
    from .train import train_detector

    torch.set_float32_matmul_precision("high")
    result = train_detector(
        load_config(DetConfig, args.config, args.overrides, complete=True), resume=args.resume
    )
    print(json.dumps(result))
    return 1 if result["interrupted"] else 0


def _evaluate(args) -> int:
    from omegaconf import OmegaConf

    from crossmae import distributed as du
    from crossmae.checkpoint import load_checkpoint, load_state_dict_strict

    from .config import DetConfig
    from .data import CocoInstances
    from .evaluate import evaluate_detector
    from .model import build_detector
    from .train import DET_FORMAT

    ck = load_checkpoint(args.checkpoint)
    if ck["format"] != DET_FORMAT:
        raise ValueError(f"{args.checkpoint} is a {ck['format']!r} checkpoint, not {DET_FORMAT!r}"
                         " (a detector trained by this version, or made by import-d2)")  # fmt: skip
    cfg = OmegaConf.merge(OmegaConf.structured(DetConfig), ck["config"])
    dataset = CocoInstances(args.json, args.images, train=False, img_size=cfg.model.img_size)
    if ck["categories"] is None:  # imported: detectron2 maps sorted category ids to classes too
        if dataset.num_classes != ck["num_classes"]:
            raise ValueError(f"{args.json} has {dataset.num_classes} categories, the detector "
                             f"{ck['num_classes']} classes")  # fmt: skip
    elif dataset.cat_ids != ck["categories"]:
        raise ValueError(f"{args.json} has other categories than the checkpoint was trained on")
    model = build_detector(cfg.model, ck["num_classes"], ck["encoder_config"])
    load_state_dict_strict(model, ck["model"], what=str(args.checkpoint))
    device = du.init_from_env()
    torch.set_float32_matmul_precision("high")
    precision = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    metrics = evaluate_detector(model.to(device), dataset, device, precision=precision,
                                results_file=args.results)  # fmt: skip
    print(json.dumps(metrics))
    return 0


def _import_d2(args) -> int:
    from crossmae.checkpoint import save_atomic

    from .d2 import import_d2

    ck = import_d2(args.checkpoint, annotations=args.json)
    save_atomic(ck, args.output)
    arch = ck["encoder_config"]
    print(f"wrote {args.output}: ViT {arch['embed_dim']}-d x {arch['depth']}, "
          f"{ck['num_classes']} classes, {len(ck['model'])} tensors; score it with "
          f"crossmae det evaluate {args.output} --json ANN.json --images DIR")  # fmt: skip
    return 0


def register(commands) -> None:
    """``crossmae det train|evaluate|import-d2``."""
    group = commands.add_parser("det", help="ViTDet Mask R-CNN on COCO-format data",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = group.add_subparsers(dest="action", required=True)
    add_training_command(sub, "train", _train, DetConfig,
                         help="train ViTDet Mask R-CNN (COCO AP at the end)")  # fmt: skip
    p = sub.add_parser("evaluate", help="COCO box / mask AP of a trained or imported detector")
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True, help="COCO instances annotation file")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--results", default=None, help="write the COCO results json here")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast during evaluation (detectron2: fp32)")  # fmt: skip
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("import-d2", help="detectron2 ViTDet Mask R-CNN (.pth / .pkl) -> ours")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--json", default=None, help="the COCO json whose categories are its classes")
    p.set_defaults(func=_import_d2)
