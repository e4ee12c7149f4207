"""``python -m seg train --config FILE key=value ...``: UperNet semantic segmentation.
``python -m seg export-mmseg CHECKPOINT OUT.pth``: our encoder for mmsegmentation's MAE UperNet."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from crossmae.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train UperNet (mIoU at the end)")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--resume", default=None)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser(
        "export-mmseg", help="encoder -> the checkpoint mmseg's MAE UperNet configs load"
    )
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--official-arch", default=None)
    args = parser.parse_args(argv)
    if args.command == "export-mmseg":
        from crossmae.checkpoint import load_pretrained_encoder, save_atomic

        from .export import to_mmseg

        sd, _ = load_pretrained_encoder(args.checkpoint, official_arch=args.official_arch)
        save_atomic(to_mmseg(sd), args.output)
        print(f"wrote {args.output}: mmseg MAE backbone keys (backbone.layers.*)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        from .config import SegConfig
        from .train import train_segmenter

        result = train_segmenter(
            load_config(SegConfig, args.config, args.overrides), resume=args.resume
        )
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m seg {args.command}: error: {e}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "metrics"}
    if result["metrics"]:
        summary.update({k: result["metrics"][k] for k in ("mIoU", "mAcc", "aAcc")})
    print(json.dumps(summary))
    return 1 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
