"""Every registered variant and every ablation switch, at a tiny width."""

from __future__ import annotations

import pytest
import torch

import crossmae
from crossmae.data import normalize_pixels
from crossmae.models import MAE, CrossMAE, register_model
from crossmae.models.masking import mask_counts, patchify, unpatchify

TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=3,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=2,
    decoder_num_heads=2,
)


def run_and_check_grads(model: torch.nn.Module, imgs: torch.Tensor, **kw) -> dict:
    out = model(imgs, **kw)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return out


@pytest.mark.parametrize("name", crossmae.list_models())
def test_every_variant_builds_runs_and_trains(name):
    torch.manual_seed(0)
    model = crossmae.create_model(name, **TINY)
    assert model.model_name == name
    imgs = torch.randn(2, 3, 32, 32)
    out = run_and_check_grads(model, imgs)
    L, P = 16, 8 * 8 * 3
    assert out["pred"].shape == (2, L, P) and out["mask"].shape == (2, L)
    if isinstance(model, CrossMAE):
        # zeros exactly where not predicted
        assert torch.all(out["pred"][out["mask"] == 0] == 0)


@pytest.mark.parametrize("name", ["crossmae_vit_tiny_patch16", "mae_vit_tiny_patch16"])
def test_a_training_step_can_leave_the_prediction_out(name):
    """with_pred=False (what the training loop passes): the same loss and gradients, no pred."""
    model = crossmae.create_model(name, **TINY)
    imgs = torch.randn(2, 3, 32, 32)
    ids = model.mask_sampler(2, imgs.device)
    runs = []
    for with_pred in (True, False):
        model.zero_grad()
        out = model(imgs, ids_shuffle=ids, with_pred=with_pred)
        out["loss"].backward()
        runs.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, grads), (lean, lean_grads) = runs
    assert "pred" in full and "pred" not in lean
    assert torch.equal(full["loss"], lean["loss"]) and torch.equal(full["mask"], lean["mask"])
    assert all(torch.equal(a, b) for a, b in zip(grads, lean_grads, strict=True))


def test_registry_defaults_follow_the_paper():
    sizes = (
        "tiny_patch8",
        "tiny_patch16",
        "small_patch16",
        "base_patch16",
        "large_patch16",
        "huge_patch14",
    )
    expected = {f"{kind}_vit_{size}" for kind in ("crossmae", "mae") for size in sizes}
    assert set(crossmae.list_models()) == expected
    # small decoders are 256-d / 8 heads, the others 512-d / 16 heads; depth 12 (CrossMAE), 8 (MAE)
    cfg = crossmae.create_model("crossmae_vit_small_patch16", depth=1).config
    assert (cfg["decoder_embed_dim"], cfg["decoder_num_heads"], cfg["decoder_depth"]) == (
        256,
        8,
        12,
    )
    cfg = crossmae.create_model("mae_vit_base_patch16", depth=1).config
    assert (cfg["decoder_embed_dim"], cfg["decoder_num_heads"], cfg["decoder_depth"]) == (
        512,
        16,
        8,
    )
    cfg = crossmae.create_model("crossmae_vit_huge_patch14", depth=1, img_size=28).config
    assert (cfg["embed_dim"], cfg["patch_size"], cfg["decoder_embed_dim"]) == (1280, 14, 512)


def test_registry_errors():
    with pytest.raises(KeyError, match="did you mean crossmae_vit_base_patch16"):
        crossmae.create_model("crossmae_vit_bsae_patch16")
    with pytest.raises(ValueError, match="already registered"):
        register_model("mae_vit_base_patch16", MAE, {})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(fm_weighting="softmax"),
        dict(fm_weighting="linear_proj"),
        dict(weight_fm=False),  # last feature map only, no inter-block attention
        dict(use_fm=[0, -1], use_input=False),
        dict(use_fm=[2], use_input=False),
        dict(self_attn=True),
        dict(masking="grid", pred_ratio=0.5),
        dict(pred_ratio=0.25, decoder_depth=1),
    ],
    ids=repr,
)
def test_crossmae_ablations_run(overrides):
    torch.manual_seed(0)
    model = CrossMAE(**{**TINY, **overrides})
    run_and_check_grads(model, torch.randn(2, 3, 32, 32))


def test_last_map_only_uses_the_encoder_norm():
    model = CrossMAE(**TINY, weight_fm=False)
    assert isinstance(model.encoder.norm, torch.nn.LayerNorm) and model.decoder.iba is None
    model = CrossMAE(**TINY)
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    assert model.decoder.iba.weight.shape == (TINY["decoder_depth"], TINY["depth"] + 1)


def test_softmax_weights_are_a_convex_combination():
    model = CrossMAE(**TINY, fm_weighting="softmax")
    w = model.decoder.iba.mixing_weights()
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0])) and torch.all(w > 0)


@pytest.mark.parametrize("name", ["crossmae_vit_tiny_patch16", "mae_vit_tiny_patch16"])
def test_uint8_pixels_are_normalised_by_the_model(name):
    """The training loop feeds uint8 pixels: the loss is the one of the normalised images, and
    the normalisation constants are not part of the checkpoint."""
    model = crossmae.create_model(name, **TINY)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = model.mask_sampler(2, pixels.device)
    ref = model(normalize_pixels(pixels), ids_shuffle=ids)["loss"]
    assert torch.equal(model(pixels, ids_shuffle=ids)["loss"], ref)
    assert not any(k.startswith("pixel_") for k in model.state_dict())


@pytest.mark.parametrize("mode", ["linear", "linear_proj"])
def test_mixtures_keep_the_maps_precision_under_autocast(mode):
    """The mixing product runs in bf16 under autocast, but the mixtures come back in the maps'
    fp32, so the decoder's LayerNorms normalise in fp32 on CPU as on CUDA."""
    model = CrossMAE(**TINY, fm_weighting=mode)
    maps = [torch.randn(2, 5, TINY["embed_dim"]) for _ in range(TINY["depth"] + 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.decoder.iba(maps)
        kv = model.decoder.kv_inputs(maps)
    assert mixed.dtype == torch.float32 and all(y.dtype == torch.float32 for y in kv)


@pytest.mark.parametrize(
    "overrides", [dict(), dict(weight_fm=True), dict(masking="grid")], ids=repr
)
def test_mae_variants_run(overrides):
    torch.manual_seed(0)
    model = MAE(**{**TINY, **overrides})
    out = run_and_check_grads(model, torch.randn(2, 3, 32, 32))
    assert torch.all(out["mask"].sum(1) == 16 - 4)


@pytest.mark.parametrize(
    "p, g, L, expected",
    [
        (0.9, 0.1, 196, 21),  # int() truncation: 21, not 19 (docs/reference.md)
        (0.75, 0.25, 196, 49),
        (0.75, 0.75, 196, 147),
        (0.75, 0.5, 16, 8),
        (0.75, 0.15, 196, 30),
        (0.5, 0.5, 64, 32),
    ],
)
def test_predicted_token_counts(p, g, L, expected):
    side = int(L**0.5)
    model = CrossMAE(**{**TINY, "img_size": side * 8}, mask_ratio=p, pred_ratio=g)
    out = model(torch.randn(2, 3, side * 8, side * 8))
    assert mask_counts(L, p, g).n_pred == expected
    assert torch.all(out["mask"].sum(1) == expected)
    assert torch.all((out["pred"].abs().sum(-1) > 0).sum(1) == expected)


def test_forward_ratio_overrides_and_fixed_mask():
    torch.manual_seed(0)
    model = CrossMAE(**TINY)
    imgs = torch.randn(2, 3, 32, 32)
    ids = torch.stack([torch.randperm(16), torch.randperm(16)])
    out = model(imgs, mask_ratio=0.5, pred_ratio=0.25, ids_shuffle=ids)
    # visible = first 8, ignored = next 4, predicted = last 4 of each permutation
    expected = torch.zeros(2, 16)
    expected.scatter_(1, ids[:, 12:], 1.0)
    assert torch.equal(out["mask"], expected)
    again = model(imgs, mask_ratio=0.5, pred_ratio=0.25, ids_shuffle=ids)
    assert torch.equal(out["pred"], again["pred"])


def test_grid_masking_keeps_one_of_every_four():
    model = CrossMAE(**{**TINY, "img_size": 64}, masking="grid")
    out = model(torch.randn(2, 3, 64, 64))
    visible = out["ids_shuffle"][:, :16]
    rows, cols = visible // 8, visible % 8
    assert torch.all(rows % 2 == 0) and torch.all(cols % 2 == 0)
    assert torch.all(out["mask"].sum(1) == 48)
    with pytest.raises(ValueError, match="grid masking"):
        CrossMAE(**TINY, masking="grid", mask_ratio=0.6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(pred_ratio=0.8), "prediction ratio"),
        (dict(mask_ratio=1.0), "0 < p < 1"),
        (dict(mask_ratio=0.0), "0 < p < 1"),
        (dict(mask_ratio=0.99), "no visible patch"),
        (dict(pred_ratio=0.0), "prediction ratio"),
        (dict(img_size=30), "not a positive multiple of the patch size"),
        (dict(use_fm=[3]), r"use_fm indices \[3\] are out of range"),
        (dict(use_fm=[-4]), "out of range"),
        (dict(use_fm=[1, -2]), "twice"),
        (dict(use_fm=[]), "empty"),
        (dict(fm_weighting="cosine"), "inter-block attention mode"),
        (dict(masking="block"), "masking must be"),
    ],
    ids=repr,
)
def test_bad_settings_fail_clearly(overrides, match):
    with pytest.raises(ValueError, match=match):
        CrossMAE(**{**TINY, **overrides})


def test_bad_forward_inputs_fail_clearly():
    model = CrossMAE(**TINY)
    with pytest.raises(ValueError, match="input is 48x32"):
        model(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="prediction ratio"):
        model(torch.randn(1, 3, 32, 32), pred_ratio=0.9)
    with pytest.raises(ValueError, match="ids_shuffle must be"):
        model(torch.randn(2, 3, 32, 32), ids_shuffle=torch.arange(16).expand(1, -1))


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 8)
    assert x.shape == (2, 24, 8 * 8 * 3)
    assert torch.equal(unpatchify(x, 8, (4, 6)), imgs)
    # patch 1 is the second patch of the first row; pixels ordered (row, col, channel)
    assert torch.equal(x[0, 1, :3], imgs[0, :, 0, 8])


def test_a_model_is_named_with_what_its_name_does_not_say(capsys):
    from crossmae.cli import main
    from crossmae.models import create_model
    from crossmae.models.registry import describe

    config = create_model("crossmae_vit_tiny_patch8", img_size=64, decoder_depth=4).config
    assert describe("crossmae_vit_tiny_patch8", config) == (
        "crossmae_vit_tiny_patch8 (img_size=64, decoder_depth=4)")  # fmt: skip
    plain = create_model("mae_vit_tiny_patch8").config
    assert describe("mae_vit_tiny_patch8", plain) == "mae_vit_tiny_patch8"
    assert main(["models", "*tiny_patch8"]) == 0
    said = capsys.readouterr()  # the names on stdout; the main job's model said beside them
    assert said.out.split() == ["crossmae_vit_tiny_patch8", "mae_vit_tiny_patch8"]
    assert "pretrain with no settings builds crossmae_vit_tiny_patch8 (img_size=64, " in said.err
