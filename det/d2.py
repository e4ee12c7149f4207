"""detectron2 interchange: read a detectron2 ViTDet Mask R-CNN checkpoint into our detector, and
write our encoder as the initial checkpoint detectron2's ViTDet configs load.

Our detector's modules carry detectron2's names and layouts (``backbone.net.*``,
``backbone.simfp_*``, ``proposal_generator.rpn_head.*``, ``roi_heads.*``; ``cls_score`` with K + 1
rows and background last, ``bbox_pred`` with 4K rows, one mask channel per class), so importing
renames nothing: it reads the file, infers the architecture from the tensor shapes, checks the
layout, and loads strictly. Class-agnostic box or mask heads (4 or 1 rows) are not ViTDet's and
are refused.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmae.checkpoint import SafeUnpickler, load_foreign_checkpoint
from crossmae.models.layers import resample_patch_weight
from crossmae.models.pos_embed import resample_abs_pos_embed

NET = "backbone.net."
NOT_WEIGHTS = ("pixel_mean", "pixel_std")  # buffers some detectron2 versions saved


def read_d2_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a detectron2 checkpoint: a ``.pkl`` of numpy arrays (the model
    zoo's format) or a torch file (``{"model": state dict}`` as detectron2's checkpointer writes
    it, or a bare state dict); neither runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".pkl":
        try:
            raw = io.BytesIO(path.read_bytes())
            data = SafeUnpickler(raw, strict=True, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{path} is not a detectron2 .pkl checkpoint ({e})") from None
    else:
        data = load_foreign_checkpoint(path)
    if isinstance(data, dict) and isinstance(data.get("format"), str):
        raise ValueError(f"{path} is a {data['format']!r} file, not a detectron2 model checkpoint")
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not model:
        raise ValueError(f"{path}: no model state dict (expected a 'model' dict of tensors)")
    out = {}
    for k, v in model.items():
        if k in NOT_WEIGHTS:
            continue
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v
    return out


def _widths(sd: dict[str, torch.Tensor], fmt: str, start: int = 1) -> list[int]:
    """Output widths of the numbered layers ``fmt.format(i)``, i = start, start + 1, ..."""
    out, i = [], start
    while fmt.format(i) in sd:
        out.append(sd[fmt.format(i)].shape[0])
        i += 1
    return out


def d2_architecture(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture a detectron2 ViTDet Mask R-CNN state dict holds, inferred from shapes:
    ``encoder`` (the ViT's settings, as our encoder configs name them), ``detector`` (img_size,
    window, global blocks, head widths, as ``DetConfig.model`` names them) and ``num_classes``."""
    need = [NET + "pos_embed", NET + "patch_embed.proj.weight", NET + "blocks.0.attn.rel_pos_h",
            "backbone.simfp_4.0.weight", "roi_heads.box_predictor.cls_score.weight",
            "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.mask_head.predictor.weight",
            "roi_heads.mask_head.deconv.weight"]  # fmt: skip
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a detectron2 ViTDet Mask R-CNN state dict: no {missing}")
    pos = sd[NET + "pos_embed"]
    embed_dim, slots = pos.shape[-1], pos.shape[1]
    patch = sd[NET + "patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(slots - 1)
    if side * side != slots - 1:
        raise ValueError(f"pos_embed has {slots} slots: not a square grid plus a cls slot")
    depth = len(_widths(sd, NET + "blocks.{}.norm1.weight", 0))
    head_dim = sd[NET + "blocks.0.attn.rel_pos_h"].shape[1]
    sizes = [(sd[f"{NET}blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
    grid, window = max(sizes), min(sizes)
    if grid == window:
        raise ValueError("all relative tables have one size: window and global blocks are unknown")
    classes = sd["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    for key, rows, what in (("roi_heads.box_predictor.bbox_pred.weight", 4 * classes, "4 x K"),
                            ("roi_heads.mask_head.predictor.weight", classes, "K")):  # fmt: skip
        if sd[key].shape[0] != rows:
            raise ValueError(
                f"{key} has {sd[key].shape[0]} rows for {classes} classes (cls_score has K + 1 = "
                f"{classes + 1}); ViTDet's heads are class-specific ({what} rows)"
            )
    encoder = {
        "img_size": side * patch, "patch_size": patch, "embed_dim": embed_dim, "depth": depth,
        "num_heads": embed_dim // head_dim, "norm_eps": 1e-6,
        "mlp_ratio": sd[f"{NET}blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    }  # fmt: skip
    detector = {
        "img_size": grid * patch,
        "window": window,
        "global_blocks": [i for i, s in enumerate(sizes) if s == grid],
        "heads": {
            "pyramid_channels": sd["backbone.simfp_4.0.weight"].shape[0],
            "box_conv_dims": _widths(sd, "roi_heads.box_head.conv{}.weight"),
            "box_fc_dims": _widths(sd, "roi_heads.box_head.fc{}.weight"),
            "mask_conv_dims": _widths(sd, "roi_heads.mask_head.mask_fcn{}.weight"),
            "mask_deconv_dim": sd["roi_heads.mask_head.deconv.weight"].shape[1],
        },
    }
    return {"encoder": encoder, "detector": detector, "num_classes": classes}


def d2_init_checkpoint(
    sd: dict[str, torch.Tensor], config: dict[str, Any], patch_size: int = 16
) -> tuple[dict, str]:
    """Our encoder (timm / MAE names) as detectron2's ViTDet configs initialise from it
    (``train.init_checkpoint``): ``{"model": state dict}`` in the MAE release layout. ViTDet runs
    at stride ``patch_size`` (16): an encoder of another patch size (ViT-H/14) is written as
    detectron2's H config loads its ``mae_pretrain_vit_huge_p14to16.pth``, with the patch kernel
    resampled to 16 px and the position table to the grid of 16-px patches at the pretraining
    resolution (16 x 16 -> 14 x 14 at 224 px). Returns the checkpoint and a line saying what was
    written."""
    sd = dict(sd)
    p = config["patch_size"]
    note = f"{len(sd)} encoder tensors, MAE release layout"
    if p != patch_size:
        old = config["img_size"] // p
        new = config["img_size"] // patch_size
        sd["patch_embed.proj.weight"] = resample_patch_weight(sd["patch_embed.proj.weight"],
                                                              patch_size)  # fmt: skip
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (new, new), (old, old))
        note += (f"; patch {p} -> {patch_size} (kernel resampled) and position grid {old}x{old} -> "
                 f"{new}x{new}, as detectron2's ViTDet expects (its *_p14to16 files)")  # fmt: skip
    return {"model": sd}, note


def import_d2(
    path: str | Path, *, annotations: str | Path | None = None, config: dict | None = None
) -> dict:
    """A detectron2 ViTDet Mask R-CNN checkpoint -> our detection checkpoint (loaded strictly:
    every tensor used, none missing). ``annotations``: the COCO json whose sorted category ids
    the classes stand for (checked against the class count); without it the checkpoint leaves
    them open and ``det evaluate`` maps any json with as many categories the same way, as
    detectron2 does. ``config``: DetConfig values (nested) to set besides the inferred ones."""
    from omegaconf import OmegaConf

    from crossmae.checkpoint import load_state_dict_strict
    from crossmae.config import to_plain

    from .config import DetConfig
    from .model import DET_FORMAT, build_detector

    sd = read_d2_checkpoint(path)
    arch = d2_architecture(sd)
    inferred = {"model": {**arch["detector"], "pretrain_img_size": arch["encoder"]["img_size"]}}
    cfg = OmegaConf.merge(OmegaConf.structured(DetConfig), inferred, config or {})
    model = build_detector(cfg.model, arch["num_classes"], arch["encoder"])
    load_state_dict_strict(model, {k: v.float() for k, v in sd.items()}, what=str(path))
    categories = None
    if annotations is not None:
        import json

        cats = sorted(c["id"] for c in json.loads(Path(annotations).read_text())["categories"])
        if len(cats) != arch["num_classes"]:
            raise ValueError(f"{annotations} has {len(cats)} categories, {path} "
                             f"{arch['num_classes']} classes")  # fmt: skip
        categories = cats
    return {"format": DET_FORMAT, "model": model.state_dict(), "categories": categories,
            "num_classes": arch["num_classes"], "encoder_config": arch["encoder"],
            "config": to_plain(cfg), "converted_from": str(path)}  # fmt: skip
