"""Typed configs: every file in configs/pretrain loads and describes a buildable model; typos and
wrong types fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO

from crossmae.cli import main
from crossmae.config import ConfigError, PretrainConfig, load_config
from crossmae.optim import pretrain_lr
from crossmae.train import build_model

PRETRAIN_CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_there_is_a_config_per_paper_setting():
    names = {p.stem for p in PRETRAIN_CONFIGS}
    for size in ("small", "base", "large", "huge"):
        for g in ("0.25", "0.75"):
            assert f"crossmae_vit_{size}_800ep_pred{g}" in names
    assert {"crossmae_vit_base_400ep_ablation", "mae_vit_base_800ep"} <= names


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_pretrain_config_loads_and_builds(path: Path):
    text = path.read_text()
    assert text.startswith("# ") and "# Command:" in text and "# Hardware:" in text
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(PretrainConfig, [path])  # the dataset is a required setting
    cfg = load_config(PretrainConfig, [path], ["data.path=/imagenet/train"])
    with torch.device("meta"):  # the architecture, without allocating ViT-H
        model = build_model(cfg.model)
    assert model.config["img_size"] == 224 and model.mask_ratio == 0.75
    g = getattr(model, "pred_ratio", 0.75)
    assert f"pred{g}" in path.stem or "mae" in path.stem or "ablation" in path.stem
    assert pretrain_lr(cfg.optim.blr, cfg.train.batch_size, 0.75, g) == pytest.approx(
        1.5e-4 * 4096 / 256 * g / 0.75
    )


def test_typos_and_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.weight_decy.*Did you mean: 'weight_decay'"):
        load_config(PretrainConfig, [], ["optim.weight_decy=0.1"])
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(PretrainConfig, [], ["train.epochs=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  mask_ration: 0.5\n")
    with pytest.raises(ConfigError, match=r"model\.mask_ration"):
        load_config(PretrainConfig, [bad])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, [tmp_path / "nope.yaml"])
    # free-form model kwargs accept any constructor argument; the model checks them
    cfg = load_config(PretrainConfig, [], ["model.kwargs.fm_weighting=softmax"])
    assert build_model(cfg.model).decoder.iba.mode == "softmax"
    cfg = load_config(
        PretrainConfig, [], ["model.name=mae_vit_tiny_patch16", "model.pred_ratio=0.5"]
    )
    with pytest.raises(ConfigError, match="pred_ratio"):
        build_model(cfg.model)


def test_cli_reports_config_errors(capsys):
    assert main(["pretrain", "optim.weight_decy=0.1"]) == 2
    assert "optim.weight_decy" in capsys.readouterr().err
