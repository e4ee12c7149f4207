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


def _pretrain(args: argparse.Namespace) -> int:
    from .config import PretrainConfig, load_config
    from .train import pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    summary = pretrain(cfg, resume=args.resume)
    return 1 if summary["interrupted"] else 0


def _psnr(args: argparse.Namespace) -> int:
    import json

    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .models import create_model
    from .reconstruction import folder_reconstruction_metrics

    ckpt = load_checkpoint(args.checkpoint)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = create_model(ckpt["model_name"], **ckpt["model_config"])
    else:
        model = model_from_checkpoint(ckpt)
    pred_ratio = model.mask_ratio if args.all_masked else None
    metrics = folder_reconstruction_metrics(
        model, args.data, images=args.images, batch_size=args.batch_size, seed=args.seed,
        pred_ratio=pred_ratio, device="cuda" if torch.cuda.is_available() else "cpu",
    )  # fmt: skip
    record = {
        "checkpoint": str(args.checkpoint),
        "step": ckpt.get("step"),
        "weights": "random init" if args.random_init else "trained",
        "data": args.data,
        "all_masked_decoded": args.all_masked,
        **metrics,
    }
    print(json.dumps(record))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossmae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list registered models (with --params: their sizes)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--params", action="store_true", help="build each model and count parameters")
    p.set_defaults(func=_models)

    p = sub.add_parser(
        "pretrain",
        help="pretrain CrossMAE / MAE (no arguments: a small CrossMAE on built-in photos)",
        description="Pretrain a CrossMAE or MAE model. Under torchrun, every process runs this.",
    )
    p.add_argument("--config", action="append", default=[], help="YAML file (repeatable, in order)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' = continue the output_dir's last checkpoint (or start fresh); or a path",
    )
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.epochs=5")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser(
        "psnr",
        help="reconstruction loss and masked-patch PSNR of a pretraining checkpoint on a folder",
    )
    p.add_argument("checkpoint", help="a pretraining checkpoint (checkpoint-last.pt)")
    p.add_argument("--data", required=True, help="image folder (ImageFolder or flat)")
    p.add_argument("--images", type=int, default=1000, help="images, spread evenly over the folder")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="fixes the masks (and a random init)")
    p.add_argument("--all-masked", action="store_true", help="decode every masked patch (γ = p)")
    p.add_argument(
        "--random-init", action="store_true", help="the checkpoint's architecture, untrained"
    )
    p.set_defaults(func=_psnr)
    return parser


def run_command(prog: str, args: argparse.Namespace, extra: tuple[type, ...] = ()) -> int:
    """Run ``args.func(args)``, the one error path of every command: an expected problem (a
    config value, a missing or malformed file, a checkpoint of another kind: ``ConfigError``,
    ``OSError``s about paths, ``ValueError``, ``KeyError``, and ``extra``) prints one line naming
    it and returns 2; anything else keeps its traceback."""
    from .config import ConfigError

    expected = (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError,
                KeyError, *extra)  # fmt: skip
    try:
        return args.func(args)
    except expected as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # no repr quotes
        print(f"{prog} {args.command}: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command("crossmae", build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
