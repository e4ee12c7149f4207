"""Pretrained encoders for classification: from our pretraining checkpoints, our encoder-only
exports, or official MAE / CrossMAE releases, into a ViT classifier at any input size.

Strict loading, by assertion (MAE ``main_finetune.py``): the only keys that may be missing are
the new ``head`` and ``fc_norm`` (and ``norm`` when the checkpoint has none, as CrossMAE with
inter-block attention); with average pooling the checkpoint's ``norm`` is dropped on purpose
(``fc_norm`` after pooling replaces it, the MAE finetune recipe).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from crossmae.checkpoint import ENCODER_FORMAT, PRETRAIN_FORMAT, load_state_dict_strict
from crossmae.models import VisionTransformer, create_model
from crossmae.models.official import official_to_ours

log = logging.getLogger(__name__)


def _encoder_config_of(model_name: str, model_config: dict[str, Any]) -> dict[str, Any]:
    with torch.device("meta"):  # the architecture only, no memory, no init cost
        return dict(create_model(model_name, **model_config).encoder.config)


def load_pretrained_encoder(
    path: str | Path, *, official_arch: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encoder weights (timm names) and the encoder's constructor settings of a checkpoint.

    Args:
        path: one of our pretraining checkpoints (``checkpoint-last.pt``), an encoder export
            (``encoder.pt``), or an official release (``{"model": state_dict}``).
        official_arch: for an official release, the registered model it was trained as, e.g.
            ``crossmae_vit_base_patch16`` or ``mae_vit_large_patch16`` (official files do not say).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == PRETRAIN_FORMAT:
        sd = {
            k.removeprefix("encoder."): v
            for k, v in ckpt["model"].items()
            if k.startswith("encoder.")
        }
        return sd, _encoder_config_of(ckpt["model_name"], ckpt["model_config"])
    if fmt == ENCODER_FORMAT:
        return dict(ckpt["encoder"]), dict(ckpt["encoder_config"])
    if fmt is None and isinstance(ckpt, dict) and "model" in ckpt:
        if official_arch is None:
            raise ValueError(
                f"{path} is an official checkpoint: name the model it was trained as with "
                "official_arch (e.g. crossmae_vit_base_patch16)"
            )
        kind = official_arch.split("_")[0]
        ours = official_to_ours(ckpt["model"], kind=kind)
        sd = {k.removeprefix("encoder."): v for k, v in ours.items() if k.startswith("encoder.")}
        overrides = {"weight_fm": "norm.weight" not in sd} if kind == "crossmae" else {}
        return sd, _encoder_config_of(official_arch, overrides)
    raise ValueError(f"{path}: not a pretraining checkpoint, encoder export or official release")


def build_classifier(
    state_dict: dict[str, torch.Tensor],
    encoder_config: dict[str, Any],
    *,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    global_pool: str = "avg",
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """A ViT classifier initialised from pretrained encoder weights.

    The position table is loaded at the pretraining grid, then resampled to ``img_size``
    (bicubic; any size, square or not). ``global_pool="avg"``: mean of patch tokens + ``fc_norm``
    (the CrossMAE/MAE finetune recipe); ``"token"``: the cls token after ``norm``.
    """
    cfg = {
        **encoder_config,
        "num_classes": num_classes,
        "global_pool": global_pool,
        "fc_norm": global_pool == "avg",
        "final_norm": global_pool == "token",
        "drop_path_rate": drop_path_rate,
        "pos_embed_trainable": True,
    }
    model = VisionTransformer(**cfg)
    sd = dict(state_dict)
    if global_pool == "avg":
        dropped = [k for k in sd if k.startswith("norm.")]
        for k in dropped:
            del sd[k]
    allowed = {k for k in model.state_dict() if k.startswith(("head.", "fc_norm."))}
    if global_pool == "token" and "norm.weight" not in state_dict:
        allowed |= {"norm.weight", "norm.bias"}  # CrossMAE with IBA has no final norm: fresh LN
    load_state_dict_strict(model, sd, allow_missing=allowed, what="pretrained encoder")
    if img_size is not None:
        model.set_img_size(img_size)
    return model
