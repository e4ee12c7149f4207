"""The ViT encoder: timm compatibility, intermediates, position-embedding resampling, layer ids."""

from __future__ import annotations

import pytest
import timm.models.vision_transformer as timm_vit
import torch

from crossmae.models import VisionTransformer
from crossmae.models.pos_embed import resample_abs_pos_embed, sincos_2d

SMALL = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)


def test_loads_strictly_into_timm_and_gives_the_same_features():
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=32, **SMALL).eval()
    ref = timm_vit.VisionTransformer(img_size=32, num_classes=0, **SMALL).eval()
    sd = ours.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_forward_intermediates_on_a_non_square_input():
    model = VisionTransformer(img_size=(32, 48), **SMALL)
    x = torch.randn(2, 3, 32, 48)
    maps = model.forward_intermediates(x, [0, -1])
    assert [m.shape for m in maps] == [(2, 32, 4, 6)] * 2
    tokens = model.forward_intermediates(x, 1, output_fmt="NLC", norm=True)
    final = model.forward_features(x)[:, 1:]
    assert torch.allclose(tokens[0], final, atol=1e-6)
    ((m, cls),) = model.forward_intermediates(x, [1], return_prefix_tokens=True)
    assert cls.shape == (2, 1, 32) and m.shape == (2, 32, 4, 6)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, [3])


def test_set_img_size_resamples_the_position_table():
    model = VisionTransformer(img_size=32, **SMALL)
    cls_slot = model.pos_embed[:, :1].clone()
    model.set_img_size((48, 64))
    assert model.pos_embed.shape == (1, 1 + 6 * 8, 32) and model.grid_size == (6, 8)
    assert torch.equal(model.pos_embed[:, :1], cls_slot)
    assert model.forward_features(torch.randn(1, 3, 48, 64)).shape == (1, 49, 32)
    with pytest.raises(ValueError, match="call set_img_size"):
        model.forward_features(torch.randn(1, 3, 32, 32))


def test_resampling_is_smooth_and_exact_on_the_same_grid():
    table = sincos_2d(64, (14, 14))
    assert resample_abs_pos_embed(table, (14, 14)) is table
    up = resample_abs_pos_embed(table, (28, 20))
    assert up.shape == (1, 1 + 28 * 20, 64)
    # corners of the grid stay close to the source corners
    src = table[0, 1:].view(14, 14, 64)
    dst = up[0, 1:].view(28, 20, 64)
    assert torch.allclose(dst[0, 0], src[0, 0], atol=0.2)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_abs_pos_embed(table[:, :-1], (7, 7))


def test_layer_ids_for_layer_decay():
    model = VisionTransformer(img_size=32, **SMALL)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.fc2.bias"] == 3
    assert ids["norm.weight"] == 4


def test_drop_path_is_stochastic_in_training_only():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, drop_path_rate=0.5, **SMALL)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model.forward_features(x), model.forward_features(x))
    model.eval()
    assert torch.equal(model.forward_features(x), model.forward_features(x))


def test_head_pooling():
    model = VisionTransformer(img_size=32, global_pool="avg", fc_norm=True, num_classes=5, **SMALL)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(img_size=32, global_pool="max", **SMALL)


def test_visible_patch_tokens_equal_the_gathered_convolution_tokens():
    """The masked encoder embeds only the kept patches: same tokens, values and gradients as
    running the convolution on every patch and gathering."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(32, 48), **SMALL)
    x = torch.randn(3, 3, 32, 48)
    ids = torch.stack([torch.randperm(24)[:7] for _ in range(3)])
    full = model.patch_tokens(x)
    ref = torch.stack([full[i, ids[i]] for i in range(3)])
    out = model.visible_patch_tokens(x, ids)
    assert torch.allclose(out, ref, atol=1e-5)
    w = model.patch_embed.proj.weight
    (g_ref,) = torch.autograd.grad(ref.square().sum(), w)
    (g,) = torch.autograd.grad(out.square().sum(), w)
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5)
