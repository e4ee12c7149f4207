"""Checkpoint converters between our layout, the official MAE / CrossMAE code, timm,
detectron2's ViTDet and mmsegmentation (the last two registered by det/ and seg/).

    # official release (the whole model, {"model": state_dict}) -> our pretraining checkpoint
    crossmae convert from-official crossmae_b.pth ours.pt --arch crossmae_vit_base_patch16
    crossmae convert from-official mae_visualize_vit_large.pth ours.pt \\
        --arch mae_vit_large_patch16 norm_pix_loss=false   # constructor settings
    # our pretraining checkpoint -> official layout (whole model)
    crossmae convert to-official runs/crossmae_b/checkpoint-last.pt official.pth
    # encoder only, the MAE release format: what detectron2's ViTDet loads (train.init_checkpoint;
    # ViT-H/14 resampled to patch 16 as its H config expects)
    crossmae convert to-mae runs/crossmae_b/checkpoint-last.pt mae_format.pth
    # timm VisionTransformer state dict (+ OUT.json: the timm.create_model call that loads it)
    crossmae convert to-timm runs/crossmae_b/checkpoint-last.pt vit_b_timm.pth
    # mmsegmentation's MAE backbone layout (see seg/export.py)
    crossmae convert to-mmseg runs/crossmae_b/checkpoint-last.pt mmseg.pth

Inputs of to-*: our pretraining checkpoint, an encoder export (encoder.pt) or, with
--official-arch, an official release. Every load is strict: a missing or unexpected key is an
error that lists it. Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from crossmae.checkpoint import (
    PRETRAIN_FORMAT,
    check_output,
    load_checkpoint,
    load_state_dict_strict,
    read_torch_file,
    save_atomic,
    write_text_atomic,
)
from crossmae.config import parse_settings
from crossmae.models import create_model, model_class
from crossmae.models.official import official_to_ours, to_official
from crossmae.models.pretrained import load_pretrained_encoder
from crossmae.models.sizes import size_of
from crossmae.task import (
    CONVERTER_ERRORS,
    FORCE_HELP,
    register_command,
    register_converter,
    register_group,
)


def from_official_file(src: str, arch: str, settings: dict) -> dict:
    """An official whole-model checkpoint -> our pretraining checkpoint (weights and the
    model's description; no optimizer state: for transfer and analysis, not for resuming)."""
    ckpt = read_torch_file(src)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{src}: not an official checkpoint ({{'model': state_dict}})")
    kind = model_class(arch).kind
    with torch.device("meta"):  # the settings given are checked before the file is read
        create_model(arch, **settings)
    ours = official_to_ours(state, kind=kind)
    settings = {**read_settings(ours, arch), **settings}  # what the file says, unless given
    model = create_model(arch, **settings)
    dtypes = {v.dtype for v in ours.values() if torch.is_floating_point(v)}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    load_state_dict_strict(model, ours, what=f"{src} read as {arch} {settings or ''}".strip())
    return {
        "format": PRETRAIN_FORMAT,
        "model_name": arch,
        "model_config": settings,
        "model": model.state_dict(),
        "converted_from": str(src),
    }


def read_settings(state: dict, arch: str) -> dict:
    """The sizes a whole-model state dict (our layout) says, where they differ from ``arch``'s
    defaults: patch size, image size (a square grid), widths and both depths; said in one
    line. Head counts are not in a state dict: set them (``decoder_num_heads=...``) if they
    differ."""
    from crossmae.models.registry import sizes_beyond_name

    def blocks(prefix: str) -> int:
        return len({k.split(".")[2] for k in state if k.startswith(f"{prefix}.blocks.")})

    try:
        proj, pos = state["encoder.patch_embed.proj.weight"], state["encoder.pos_embed"]
        patch, tokens = proj.shape[-1], pos.shape[1] - 1
        found = {"patch_size": patch, "img_size": math.isqrt(tokens) * patch,
                 "embed_dim": proj.shape[0], "depth": blocks("encoder"),
                 "decoder_depth": blocks("decoder"),
                 "decoder_embed_dim": state["decoder.pos_embed"].shape[-1]}  # fmt: skip
    except (KeyError, AttributeError, IndexError):
        return {}  # not a whole model: the strict load below names what is missing
    changed = sizes_beyond_name(arch, {k: int(n) for k, n in found.items()})
    if changed:
        print(f"read from the file: {' '.join(f'{k}={n}' for k, n in changed.items())} "
              f"(where {arch}'s defaults differ)")  # fmt: skip
    return changed


def cmd_from_official(args) -> int:
    check_output(args.src, args.dest, writes=PRETRAIN_FORMAT, force=args.force)
    out = from_official_file(args.src, args.arch, parse_settings(args.overrides))
    save_atomic(out, args.dest)
    print(f"wrote {args.dest}: {args.arch}, {len(out['model'])} tensors (our layout)")
    return 0


def cmd_to_official(args) -> int:
    check_output(args.src, args.dest, force=args.force)
    ckpt = load_checkpoint(args.src, expect=PRETRAIN_FORMAT)  # the whole model
    kind = model_class(ckpt["model_name"]).kind
    save_atomic({"model": to_official(ckpt["model"], kind=kind)}, args.dest)
    print(f"wrote {args.dest}: official {kind} layout")
    return 0


def timm_kwargs(config: dict) -> dict:
    """Our encoder's constructor settings -> timm ``VisionTransformer`` keyword arguments."""
    if abs(config["norm_eps"] - 1e-6) > 1e-12:
        raise ValueError(
            f"timm's ViT uses LayerNorm eps 1e-6; this encoder uses {config['norm_eps']}"
        )
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
            "global_pool", "final_norm", "fc_norm", "num_classes")  # fmt: skip
    return {k: config[k] for k in keys}


def cmd_to_timm(args) -> int:
    check_output(args.src, args.dest, force=args.force)
    sd, config = load_pretrained_encoder(args.src, official_arch=args.official_arch)
    kwargs = timm_kwargs(config)
    try:  # the timm model of these widths; every width is passed explicitly anyway
        name = size_of(config["embed_dim"], config["depth"], config["num_heads"]).timm_name
    except ValueError:  # an encoder of no table size (a test model)
        name = "vit_base_patch16_224"
    save_atomic(sd, args.dest)
    call = {"model_name": name, "pretrained": False, **kwargs}
    write_text_atomic(Path(str(args.dest) + ".json"), json.dumps(call, indent=1) + "\n")
    print(f"wrote {args.dest} (+ .json). In timm:\n"
          f"    model = timm.create_model(**json.load(open('{args.dest}.json')))\n"
          f"    model.load_state_dict(torch.load('{args.dest}'), strict=True)")  # fmt: skip
    return 0


register_group(
    ("convert",), "checkpoint converters (official, MAE, timm, mmseg, detectron2)", __doc__
)


@register_command(("convert", "from-official"), help="official whole-model checkpoint -> ours")
def _from_official(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--arch", required=True, help="registered model, e.g. mae_vit_base_patch16")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="constructor settings of --arch, e.g. decoder_depth=12")  # fmt: skip
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_from_official, errors=CONVERTER_ERRORS)


@register_command(("convert", "to-official"), help="ours -> the official whole-model layout")
def _to_official(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=cmd_to_official, errors=CONVERTER_ERRORS)


register_converter("to-timm", "encoder -> timm VisionTransformer state dict")(cmd_to_timm)
