"""``python -m cls frozen|linprobe|finetune --config FILE key=value ...``: kNN + fast linear
probe of a frozen encoder, the paper's linear probe, or end-to-end finetuning."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from crossmae.cli import run_command
from crossmae.config import load_config


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
    args.func = _frozen if args.command == "frozen" else _train
    return run_command("python -m cls", args)


def _frozen(args) -> int:
    from .config import FrozenEvalConfig
    from .frozen import evaluate_frozen

    result = evaluate_frozen(load_config(FrozenEvalConfig, args.config, args.overrides))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return 0


def _train(args) -> int:
    from .config import FinetuneConfig, LinprobeConfig
    from .finetune import finetune

    schema = LinprobeConfig if args.command == "linprobe" else FinetuneConfig
    result = finetune(load_config(schema, args.config, args.overrides), resume=args.resume)
    print(json.dumps(result))
    return 1 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
