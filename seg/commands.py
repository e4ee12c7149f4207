"""The command line of ``crossmae seg`` beside its training (``seg.task``): evaluate, visualize and
import checkpoints, and the encoder converter into the reference framework's layout."""

from __future__ import annotations

import argparse

import torch

from crossmae import distributed as du
from crossmae.checks import int_at_least
from crossmae.config import load_config, without_missing
from crossmae.models.pretrained import load_pretrained_encoder
from crossmae.task import register_command, register_converter, register_group

from . import task
from .config import SegConfig
from .data import SegFolder, label_spec
from .evaluate import eval_settings, evaluate_segmenter
from .metrics import format_table
from .model import SEG_FORMAT, build_segmenter

register_group(("seg",), "UperNet semantic segmentation", task.__doc__)


@register_command(("seg", "evaluate"), help="mIoU of a trained or imported segmenter")
def _evaluate_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.root=DIR, data.val_split=..., eval.*")  # fmt: skip
    p.set_defaults(func=evaluate_checkpoint)


def load_segmenter(checkpoint: str, overrides: list[str]) -> tuple:
    """A trained or imported segmenter, its config (the checkpoint's, ``key=value`` over it)
    and the validation folder it is scored on (same number of classes)."""
    from crossmae.checkpoint import load_checkpoint, load_state_dict_strict

    ck = load_checkpoint(checkpoint, expect=SEG_FORMAT)
    cfg = load_config(SegConfig, [], overrides, base=without_missing(ck["config"]))
    spec = label_spec(cfg.data)
    if spec.num_classes != ck["num_classes"]:
        raise ValueError(
            f"the dataset has {spec.num_classes} classes, the model {ck['num_classes']}"
        )
    model = build_segmenter(cfg, ck["num_classes"], ck["encoder_config"])
    load_state_dict_strict(model, ck["model"], what=str(checkpoint))
    return model, cfg, SegFolder(cfg.data.root, cfg.data.val_split, spec)


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    """A trained or imported segmenter on a dataset; ``key=value`` sets the dataset (root,
    val_split, dataset, ...) and evaluation settings over the checkpoint's config."""
    from crossmae.checkpoint import strict_json

    model, cfg, folder = load_segmenter(args.checkpoint, args.overrides)
    device = du.init_from_env(cfg.train.device)
    m = evaluate_segmenter(model.to(device), folder, folder.spec.num_classes,
                           **eval_settings(cfg))  # fmt: skip
    if du.is_main():
        print(format_table(m))
        print(strict_json({k: m[k] for k in ("mIoU", "mAcc", "aAcc")}))
    return 0


@register_command(("seg", "visualize"), help="draw a segmenter's predictions beside the ground "
                  "truth (PNGs)")  # fmt: skip
def _visualize_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.root=DIR, data.val_split=..., eval.*")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the PNGs (one per image)")
    p.add_argument("-n", "--num-images", type=int_at_least(1), default=4,
                   help="the first N images of the split (default 4)")  # fmt: skip
    p.set_defaults(func=visualize_checkpoint)


def visualize_checkpoint(args: argparse.Namespace) -> int:
    from .visualize import visualize_segmentation

    model, cfg, folder = load_segmenter(args.checkpoint, args.overrides)
    model.to("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    files = visualize_segmentation(model, folder, args.out, images=args.num_images,
                                   **eval_settings(cfg))  # fmt: skip
    print(f"wrote {len(files)} PNGs to {args.out}: image | ground truth | prediction")
    return 0


@register_command(("seg", "import-mmseg"), help="mmseg MAE UperNet checkpoint -> ours")
def _import_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model.out_indices=[3,5,7,11]")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace OUTPUT even if it is a "
                   "checkpoint of another kind")  # fmt: skip
    p.set_defaults(func=import_checkpoint)


def import_checkpoint(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic
    from crossmae.config import parse_settings

    from .export import import_mmseg

    check_output(args.checkpoint, args.output, writes=SEG_FORMAT, force=args.force)
    ck = import_mmseg(args.checkpoint, parse_settings(args.overrides))
    save_atomic(ck, args.output)
    enc = ck["encoder_config"]
    print(f"wrote {args.output}: ViT {enc['embed_dim']}-d x {enc['depth']}, "
          f"{ck['num_classes']} classes; score it with crossmae seg evaluate {args.output} "
          "data.root=DIR")  # fmt: skip
    return 0


@register_converter("to-mmseg", "encoder -> mmsegmentation MAE backbone")
def to_mmseg_file(args: argparse.Namespace) -> int:
    from crossmae.checkpoint import check_output, save_atomic

    from .export import to_mmseg

    check_output(args.src, args.dest, force=args.force)
    sd, _ = load_pretrained_encoder(args.src, official_arch=args.official_arch)
    save_atomic(to_mmseg(sd), args.dest)
    print(f"wrote {args.dest}: mmseg MAE backbone layout (layers.*, loaded with mmseg's "
          f"--cfg-options model.pretrained={args.dest})")  # fmt: skip
    return 0
