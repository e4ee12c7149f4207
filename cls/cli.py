"""``crossmae cls frozen|linprobe|finetune --config FILE key=value ...``: kNN + fast linear
probe of a frozen encoder, the paper's linear probe, or end-to-end finetuning."""

from __future__ import annotations

import json

from crossmae.cli import add_training_command, settings_help
from crossmae.config import load_config

from .config import FinetuneConfig, FrozenEvalConfig, LinprobeConfig


def register(commands) -> None:
    """``crossmae cls frozen|linprobe|finetune``."""
    group = commands.add_parser("cls", help="classification transfer: kNN + fast probe, the "
                                "linear probe, finetuning", description=__doc__)  # fmt: skip
    sub = group.add_subparsers(dest="action", required=True)
    p = sub.add_parser("frozen", help="kNN and fast linear probe of a frozen encoder",
                       epilog=settings_help(FrozenEvalConfig))  # fmt: skip
    p.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_frozen)
    for name, schema, what in (
        ("finetune", FinetuneConfig, "end-to-end finetuning (MAE / CrossMAE recipe)"),
        ("linprobe", LinprobeConfig, "the paper's linear probe (frozen encoder, LARS)"),
    ):
        add_training_command(sub, name, _train, schema, help=what)


def _frozen(args) -> int:
    from .config import FrozenEvalConfig
    from .frozen import evaluate_frozen

    result = evaluate_frozen(
        load_config(FrozenEvalConfig, args.config, args.overrides, complete=True)
    )
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return 0


def _train(args) -> int:
    from .config import FinetuneConfig, LinprobeConfig
    from .finetune import finetune

    schema = LinprobeConfig if args.action == "linprobe" else FinetuneConfig
    result = finetune(
        load_config(schema, args.config, args.overrides, complete=True), resume=args.resume
    )
    print(json.dumps(result))
    return 1 if result["interrupted"] else 0
