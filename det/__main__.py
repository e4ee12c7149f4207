"""``python -m det train|evaluate|export-d2|import-d2``: ViTDet Mask R-CNN on COCO-format data.

python -m det train --config configs/det/mask_rcnn_vit_base_100ep.yaml key=value ...
python -m det evaluate runs/det_b/checkpoint-last.pt --json ANN.json --images DIR
python -m det export-d2 runs/crossmae_b_800/checkpoint-last.pt mae_format_vit_base.pth
python -m det import-d2 model_final.pkl vitdet_b.pt [--json ANN.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from crossmae.cli import run_command
from crossmae.config import load_config


def _train(args) -> int:
    from .config import DetConfig
    from .train import train_detector

    result = train_detector(load_config(DetConfig, args.config, args.overrides), resume=args.resume)
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
    precision = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    metrics = evaluate_detector(model.to(device), dataset, device, precision=precision,
                                results_file=args.results)  # fmt: skip
    print(json.dumps(metrics))
    return 0


def _export_d2(args) -> int:
    """Our encoder as detectron2's ViTDet configs load it with ``train.init_checkpoint=PATH``."""
    from crossmae.checkpoint import load_pretrained_encoder, save_atomic

    from .d2 import d2_init_checkpoint

    sd, config = load_pretrained_encoder(args.checkpoint, official_arch=args.official_arch)
    out, note = d2_init_checkpoint(sd, config)
    save_atomic(out, args.output)
    print(f"wrote {args.output}: {note}")
    return 0


def _import_d2(args) -> int:
    from crossmae.checkpoint import save_atomic

    from .d2 import import_d2

    ck = import_d2(args.checkpoint, annotations=args.json)
    save_atomic(ck, args.output)
    arch = ck["encoder_config"]
    print(f"wrote {args.output}: ViT {arch['embed_dim']}-d x {arch['depth']}, "
          f"{ck['num_classes']} classes, {len(ck['model'])} tensors; score it with "
          f"python -m det evaluate {args.output} --json ANN.json --images DIR")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m det",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train ViTDet Mask R-CNN (COCO AP at the end)")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--resume", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_train)
    p = sub.add_parser("evaluate", help="COCO box / mask AP of a trained or imported detector")
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True, help="COCO instances annotation file")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--results", default=None, help="write the COCO results json here")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast during evaluation (detectron2: fp32)")  # fmt: skip
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("export-d2", help="encoder -> detectron2 ViTDet initial checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--official-arch", default=None)
    p.set_defaults(func=_export_d2)
    p = sub.add_parser("import-d2", help="detectron2 ViTDet Mask R-CNN (.pth / .pkl) -> ours")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--json", default=None, help="the COCO json whose categories are its classes")
    p.set_defaults(func=_import_d2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_float32_matmul_precision("high")
    return run_command("python -m det", args)


if __name__ == "__main__":
    sys.exit(main())
