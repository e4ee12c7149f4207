"""Command line: ``crossmae <command> ...`` (also ``python -m crossmae``)."""

from __future__ import annotations

import argparse
import sys


def _models(args: argparse.Namespace) -> int:
    from .models import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    if not args.params:
        print("\n".join(names))
        return 0
    print(f"{'model':32s} {'state-dict keys':>15s} {'params (M)':>11s} {'trainable (M)':>14s}")
    for name in names:
        model = create_model(name)
        sd = model.state_dict()
        total = sum(v.numel() for v in sd.values()) / 1e6
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"{name:32s} {len(sd):15d} {total:11.2f} {trainable:14.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossmae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list registered models (with --params: their sizes)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--params", action="store_true", help="build each model and count parameters")
    p.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
