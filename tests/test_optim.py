"""Schedules and parameter groups."""

from __future__ import annotations

import pytest
import torch

from crossmae.models import VisionTransformer
from crossmae.optim import lr_at, param_groups, pretrain_lr


def test_warmup_then_cosine():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_pretrain_lr_scales_with_batch_and_prediction_ratio():
    assert pretrain_lr(1.5e-4, 4096, 0.75, 0.75) == pytest.approx(2.4e-3)
    assert pretrain_lr(1.5e-4, 4096, 0.75, 0.25) == pytest.approx(0.8e-3)


def test_no_decay_on_biases_and_1d_params_and_layer_decay():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model.pos_embed.requires_grad_(True)
    groups = param_groups(
        model, 0.05, layer_decay=0.5, layer_id=model.layer_id, num_layers=2,
        no_decay_names=model.no_weight_decay(),
    )  # fmt: skip
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    for n in ("blocks.0.attn.qkv.bias", "blocks.1.norm1.weight", "cls_token", "pos_embed"):
        assert by_name[n]["weight_decay"] == 0.0, n
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == 0.5**3
    assert by_name["blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5**1
    assert by_name["norm.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # the groups are valid optimizer input
