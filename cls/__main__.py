"""``python -m cls frozen|linprobe|finetune --config FILE key=value ...``: kNN + fast linear
probe of a frozen encoder, the paper's linear probe, or end-to-end finetuning."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from crossmae.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cls", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("frozen", help="kNN and fast linear probe of a frozen encoder")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("overrides", nargs="*")
    commands = {
        "finetune": "end-to-end finetuning (MAE / CrossMAE recipe)",
        "linprobe": "the paper's linear probe (frozen encoder, LARS)",
    }
    for name, what in commands.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("--config", action="append", default=[])
        p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
        p.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "frozen":
            from .config import FrozenEvalConfig
            from .frozen import evaluate_frozen

            result = evaluate_frozen(load_config(FrozenEvalConfig, args.config, args.overrides))
            print(json.dumps({k: v for k, v in result.items() if k != "config"}))
        else:
            from .config import FinetuneConfig, LinprobeConfig
            from .finetune import finetune

            schema = LinprobeConfig if args.command == "linprobe" else FinetuneConfig
            cfg = load_config(schema, args.config, args.overrides)
            result = finetune(cfg, resume=args.resume)
            print(json.dumps(result))
            return 1 if result["interrupted"] else 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m cls {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
