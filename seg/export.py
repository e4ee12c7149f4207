"""Our encoder in the layout of mmsegmentation's MAE / BEiT backbone.

mmseg's MAE UperNet configs load a file made by its ``tools/model_converters/beit2mmseg.py``
from the MAE release. ``to_mmseg`` makes the same file from our encoder (timm / MAE names):
``blocks`` -> ``layers``, ``norm1/2`` -> ``ln1/2``, ``mlp.fc1`` -> ``ffn.layers.0.0``,
``mlp.fc2`` -> ``ffn.layers.1``, ``patch_embed.proj`` -> ``patch_embed.projection``, everything
under ``backbone.``; classifier weights are not part of it. Then, in mmsegmentation (1.x; the
config name is mmseg's MAE ViT-B UperNet):

    python -m seg export-mmseg runs/crossmae_b_800/checkpoint-last.pt pretrain/crossmae_b_mmseg.pth
    python tools/train.py configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py \
        --cfg-options model.pretrained=pretrain/crossmae_b_mmseg.pth
"""

from __future__ import annotations

import torch


def to_mmseg(encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in encoder_state.items():
        if k.startswith(("fc_norm", "head")):
            continue
        if k.startswith("blocks."):
            k = "layers." + k.removeprefix("blocks.")
            k = k.replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
            k = k.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        elif k.startswith("patch_embed.proj."):
            k = "patch_embed.projection." + k.removeprefix("patch_embed.proj.")
        out["backbone." + k] = v
    return out
