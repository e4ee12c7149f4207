"""``python -m seg train --config FILE key=value ...``: UperNet semantic segmentation."""

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
    args = parser.parse_args(argv)
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
