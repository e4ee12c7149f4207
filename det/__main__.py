"""``python -m det train|evaluate|export-d2``: ViTDet Mask R-CNN on COCO-format data.

python -m det train --config configs/det/mask_rcnn_vit_base_100ep.yaml key=value ...
python -m det evaluate runs/det_b/checkpoint-last.pt --json ANN.json --images DIR
python -m det export-d2 runs/crossmae_b_800/checkpoint-last.pt mae_format_vit_base.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from crossmae.config import ConfigError, load_config


def _train(args) -> int:
    from .config import DetConfig
    from .train import train_detector

    result = train_detector(load_config(DetConfig, args.config, args.overrides), resume=args.resume)
    print(json.dumps(result))
    return 1 if result["interrupted"] else 0


def _evaluate(args) -> int:
    from omegaconf import OmegaConf

    from crossmae import distributed as du
    from crossmae.checkpoint import load_checkpoint

    from .config import DetConfig
    from .data import CocoInstances
    from .evaluate import evaluate_detector
    from .train import build_detector

    ck = load_checkpoint(args.checkpoint)
    cfg = OmegaConf.merge(OmegaConf.structured(DetConfig), ck["config"])
    dataset = CocoInstances(args.json, args.images, train=False, img_size=cfg.img_size)
    if dataset.cat_ids != ck["categories"]:
        raise ValueError(f"{args.json} has other categories than the checkpoint was trained on")
    model, _ = build_detector(cfg, dataset.num_classes, encoder_config=ck["encoder_config"])
    model.load_state_dict(ck["model"])
    device = du.init_from_env()
    metrics = evaluate_detector(model.to(device), dataset, device, results_file=args.results)
    print(json.dumps(metrics))
    return 0


def _export_d2(args) -> int:
    """Our encoder in the MAE release format (``{"model": encoder state dict}``), which
    detectron2's ViTDet configs load with ``train.init_checkpoint=PATH``."""
    from crossmae.checkpoint import load_pretrained_encoder, save_atomic

    sd, _ = load_pretrained_encoder(args.checkpoint, official_arch=args.official_arch)
    save_atomic({"model": sd}, args.output)
    print(f"wrote {args.output}: {len(sd)} encoder tensors (MAE release key names)")
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
    p = sub.add_parser("evaluate", help="COCO box / mask AP of a trained detector")
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True, help="COCO instances annotation file")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--results", default=None, help="write the COCO results json here")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("export-d2", help="encoder -> MAE release format for detectron2's ViTDet")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--official-arch", default=None)
    p.set_defaults(func=_export_d2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_float32_matmul_precision("high")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m det {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
