"""``crossmae seg train|evaluate|import-mmseg``: UperNet semantic segmentation.

crossmae seg train --config configs/seg/upernet_vit_base_ade20k_160k.yaml key=value ...
crossmae seg evaluate runs/seg_b/checkpoint-last.pt data.root=/data/ADEChallengeData2016 ...
crossmae seg import-mmseg upernet_mae-base_ade20k.pth upernet_b.pt [key=value ...]

The encoder as mmseg's MAE backbone loads it (model.pretrained): crossmae convert to-mmseg.
"""

from __future__ import annotations

import argparse
import json

from crossmae.cli import add_training_command
from crossmae.config import load_config, without_missing

from .config import SegConfig


def _train(args) -> int:
    from .config import SegConfig
    from .train import train_segmenter

    result = train_segmenter(
        load_config(SegConfig, args.config, args.overrides, complete=True), resume=args.resume
    )
    summary = {k: v for k, v in result.items() if k != "metrics"}
    if result["metrics"]:
        summary.update({k: result["metrics"][k] for k in ("mIoU", "mAcc", "aAcc")})
    print(json.dumps(summary))
    return 1 if result["interrupted"] else 0


def _evaluate(args) -> int:
    """A trained or imported segmenter on a dataset; ``key=value`` sets the dataset (root,
    val_split, dataset, ...) and evaluation settings over the checkpoint's config."""
    from crossmae import distributed as du
    from crossmae.checkpoint import load_checkpoint, load_state_dict_strict

    from .config import SegConfig
    from .data import SegFolder
    from .train import SEG_FORMAT, build_segmenter, eval_settings, evaluate_segmenter, label_spec

    ck = load_checkpoint(args.checkpoint)
    if ck["format"] != SEG_FORMAT:
        raise ValueError(
            f"{args.checkpoint} is a {ck['format']!r} checkpoint, not {SEG_FORMAT!r}"
            " (a segmenter trained by this version, or made by import-mmseg)"
        )
    cfg = load_config(SegConfig, [], args.overrides, base=without_missing(ck["config"]))
    spec = label_spec(cfg.data)
    if spec.num_classes != ck["num_classes"]:
        raise ValueError(
            f"the dataset has {spec.num_classes} classes, the model {ck['num_classes']}"
        )
    model = build_segmenter(cfg, ck["num_classes"], ck["encoder_config"])
    load_state_dict_strict(model, ck["model"], what=str(args.checkpoint))
    device = du.init_from_env(cfg.train.device)
    folder = SegFolder(cfg.data.root, cfg.data.val_split, spec)
    m = evaluate_segmenter(model.to(device), folder, spec.num_classes, **eval_settings(cfg))
    print(json.dumps({k: m[k] for k in ("mIoU", "mAcc", "aAcc")}))
    return 0


def _import(args) -> int:
    from crossmae.checkpoint import save_atomic
    from crossmae.config import parse_settings

    from .export import import_mmseg

    ck = import_mmseg(args.checkpoint, parse_settings(args.overrides))
    save_atomic(ck, args.output)
    enc = ck["encoder_config"]
    print(
        f"wrote {args.output}: ViT {enc['embed_dim']}-d x {enc['depth']}, "
        f"{ck['num_classes']} classes; score it with crossmae seg evaluate {args.output} "
        "data.root=DIR"
    )
    return 0


def register(commands) -> None:
    """``crossmae seg train|evaluate|import-mmseg``."""
    group = commands.add_parser("seg", help="UperNet semantic segmentation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = group.add_subparsers(dest="action", required=True)
    add_training_command(sub, "train", _train, SegConfig, help="train UperNet (mIoU at the end)")
    p = sub.add_parser("evaluate", help="mIoU of a trained or imported segmenter")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.root=DIR, data.val_split=..., eval.*")  # fmt: skip
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("import-mmseg", help="mmseg MAE UperNet checkpoint -> ours")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model.out_indices=[3,5,7,11]")  # fmt: skip
    p.set_defaults(func=_import)
