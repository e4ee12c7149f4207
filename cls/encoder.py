"""Pretrained encoders (``crossmae.models.pretrained.load_pretrained_encoder``: our pretraining
checkpoints, our encoder-only exports, or official MAE / CrossMAE releases) into a ViT
classifier at any input size.

Strict loading, by assertion (MAE ``main_finetune.py``): the only keys that may be missing are
the new ``head`` and ``fc_norm`` (and ``norm`` when the checkpoint has none, as CrossMAE with
inter-block attention); with average pooling the checkpoint's ``norm`` is dropped on purpose
(``fc_norm`` after pooling replaces it, the MAE finetune recipe).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from crossmae.checkpoint import load_state_dict_strict
from crossmae.models import VisionTransformer

log = logging.getLogger("crossmae")


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
