"""The paper's analyses (crossmae.analysis, crossmae analyze) on tiny models: per-block terms sum
to the prediction, attention masses sum to 1, PSNR of a perfect prediction is capped, fvcore
agrees with torch's FLOP counter, and each command writes its PNG / JSON."""

from __future__ import annotations

import json

import pytest
import torch
from test_convert import TINY, ours_checkpoint

from crossmae.analysis import decoder_block_terms, flop_counts, iba_weights, mae_attention_mass
from crossmae.cli import main
from crossmae.models import create_model
from crossmae.reconstruction import PSNR_CAP, masked_psnr


def analyze(*argv: str) -> int:
    return main(["analyze", *argv])


@pytest.mark.parametrize("pred_ratio", [None, 0.75])
def test_decoder_block_terms_sum_to_the_prediction(pred_ratio):
    torch.manual_seed(0)
    model = create_model("crossmae_vit_base_patch16", **TINY, pred_ratio=0.25).eval()
    imgs = torch.randn(3, 3, 32, 32)
    ids = model.mask_sampler(3, "cpu")
    res = decoder_block_terms(model, imgs, ids, pred_ratio=pred_ratio)
    assert res["terms"].shape[0] == 1 + TINY["decoder_depth"]
    assert res["ids_pred"].shape[1] == (4 if pred_ratio is None else 12)  # γ·16, p·16 patches
    with torch.no_grad():
        full = model(imgs, ids_shuffle=ids, pred_ratio=pred_ratio)["pred"]
    pred = torch.gather(full, 1, res["ids_pred"].unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(res["terms"].sum(0), pred, atol=1e-5)
    assert all(t.abs().max() > 0 for t in res["terms"])


def test_mae_attention_masses_sum_to_one_and_are_uniform_without_queries():
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", **TINY).eval()
    imgs = torch.randn(2, 3, 32, 32)
    ids = model.mask_sampler(2, "cpu")
    res = mae_attention_mass(model, imgs, ids)
    assert torch.allclose(res["per_query_sum"], torch.ones(()), atol=1e-5)
    assert torch.allclose(res["visible"] + res["cls"] + res["mask"], torch.ones(2), atol=1e-5)
    # zero queries: every key gets 1 / (1 + L): 4 visible patches, the cls token, 12 mask tokens
    with torch.no_grad():
        for blk in model.decoder.blocks:
            dim = blk.attn.proj.in_features
            blk.attn.qkv.weight[:dim] = 0
            blk.attn.qkv.bias[:dim] = 0
    res = mae_attention_mass(model, imgs, ids)
    assert torch.allclose(res["visible"], torch.full((2,), 4 / 17), atol=1e-6)
    assert torch.allclose(res["cls"], torch.full((2,), 1 / 17), atol=1e-6)
    assert torch.allclose(res["mask"], torch.full((2,), 12 / 17), atol=1e-6)


def test_psnr_of_a_perfect_prediction_is_capped():
    imgs = torch.rand(2, 3, 32, 32)
    predicted = (torch.rand(2, 16) < 0.5).float()
    predicted[:, 0] = 1
    assert torch.equal(masked_psnr(imgs, imgs, predicted, 8), torch.full((2,), PSNR_CAP))
    noisy = (imgs + 0.1 * torch.randn_like(imgs)).clamp(0, 1)
    assert (masked_psnr(noisy, imgs, predicted, 8) < 30).all()


@pytest.mark.slow
def test_fvcore_counts_agree_with_torch_and_crossmae_decodes_cheaper():
    cross = flop_counts(create_model("crossmae_vit_base_patch16", pred_ratio=0.25))
    mae = flop_counts(create_model("mae_vit_base_patch16"))
    for c in (cross, mae):
        # same matrix-product and attention work; fvcore's total adds the LayerNorms
        assert c["matmul"] == pytest.approx(c["torch_total"], rel=1e-6)
        assert c["torch_decoder"] <= c["decoder"] <= 1.01 * c["torch_decoder"]
        assert c["encoder"] + c["decoder"] == pytest.approx(c["total"], rel=1e-6)
    assert cross["encoder"] == pytest.approx(mae["encoder"], rel=1e-3)
    assert cross["decoder"] < 0.5 * mae["decoder"]


@pytest.mark.slow
def test_every_analysis_command_writes_its_outputs(shared_dir, tmp_path):
    cross = ours_checkpoint(tmp_path / "c.pt", pred_ratio=0.25)
    ours_checkpoint(tmp_path / "m.pt", name="mae_vit_base_patch16")
    images = str(shared_dir / "data" / "imagenette" / "val")
    out = tmp_path / "out"
    c, m = ["--crossmae", str(tmp_path / "c.pt")], ["--mae", str(tmp_path / "m.pt")]
    common = ["--images", images, "--out", str(out)]
    assert analyze("recon", *c, *m, *common, "-n", "2") == 0
    assert analyze("blocks", *c, *common, "-n", "2") == 0
    assert analyze("iba", *c, "--out", str(out)) == 0
    assert analyze("attention", *m, *common, "-n", "2") == 0
    assert analyze("flops", "--models", "crossmae_vit_tiny_patch16", "--out", str(out),
                   "decoder_depth=2") == 0  # fmt: skip
    psnr = [str(tmp_path / "c.pt"), str(tmp_path / "m.pt"), "--data", images, "--images", "8"]
    assert main(["psnr", *psnr, "--out", str(out / "psnr.json")]) == 0
    assert main(["psnr", *psnr[:1], *psnr[2:], "--all-masked", "--out", str(out / "all.json")]) == 0
    for name in ("reconstructions", "decoder_blocks", "iba_weights", "mae_attention", "flops"):
        assert (out / f"{name}.png").stat().st_size > 1000
    rec = json.loads((out / "reconstructions.json").read_text())
    assert rec["predicted_patches"] == {"MAE": 12, "CrossMAE γ=0.25": 4, "CrossMAE, all masked": 12}
    ours_checkpoint(tmp_path / "p.pt", pred_ratio=0.75)  # γ = p: one CrossMAE column, not two
    assert analyze("recon", "--crossmae", str(tmp_path / "p.pt"), *common, "-n", "2") == 0
    rec = json.loads((out / "reconstructions.json").read_text())
    assert rec["predicted_patches"] == {"CrossMAE γ=p=0.75": 12}
    blocks = json.loads((out / "decoder_blocks.json").read_text())
    assert blocks["max_abs_error_sum_vs_prediction"] < 1e-4
    iba = json.loads((out / "iba_weights.json").read_text())
    assert torch.allclose(torch.tensor(iba["weights"]), iba_weights(cross))
    att = json.loads((out / "mae_attention.json").read_text())
    assert sum(att["mean"].values()) == pytest.approx(1.0, abs=1e-5)
    psnr = [
        *json.loads((out / "psnr.json").read_text()),
        *json.loads((out / "all.json").read_text()),
    ]
    assert [(r["model"], r["all_masked_decoded"]) for r in psnr] == [
        ("crossmae_vit_base_patch16", False), ("mae_vit_base_patch16", False),
        ("crossmae_vit_base_patch16", True)]  # fmt: skip
    assert all(r["images"] == 8 and 0 < r["psnr"] < PSNR_CAP for r in psnr)
    flops = json.loads((out / "flops.json").read_text())["rows"]
    assert [r["pred_ratio"] for r in flops] == [0.25, 0.75]
    assert all(r["settings"] == {"decoder_depth": 2} for r in flops)


def test_analyses_reject_the_wrong_model(tmp_path, capsys):
    ours_checkpoint(tmp_path / "m.pt", name="mae_vit_base_patch16")
    assert analyze("iba", "--crossmae", str(tmp_path / "m.pt"), "--out", str(tmp_path)) == 2
    assert "expected a CrossMAE" in capsys.readouterr().err
