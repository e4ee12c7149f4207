"""Typed configs: every file in configs/pretrain loads and describes a buildable model; typos and
wrong types fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO

from crossmae.cli import main
from crossmae.config import ConfigError, load_config
from crossmae.optim import peak_lr
from crossmae.pretrain import PretrainConfig, build_model

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
    assert peak_lr(cfg.optim, cfg.train.batch_size, g / 0.75) == pytest.approx(
        1.5e-4 * 4096 / 256 * g / 0.75
    )


def test_typos_and_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.weight_decy.*Did you mean.*'weight_decay'"):
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


def test_an_encoder_is_a_checkpoint_or_an_untrained_architecture(tmp_path):
    from cls.config import FinetuneConfig
    from crossmae.config import ConfigError
    from crossmae.models.pretrained import encoder_of

    base = ["output_dir=o", "data.train=t", "data.val=v"]
    untrained = ["encoder.checkpoint=null", "encoder.arch=mae_vit_tiny_patch16",
                 "encoder.arch_settings.patch_size=4"]  # fmt: skip
    cfg = load_config(FinetuneConfig, [], [*base, *untrained], complete=True)
    weights, settings = encoder_of(cfg.encoder)
    assert weights is None and settings["patch_size"] == 4 and settings["embed_dim"] == 192
    for bad, match in ((["encoder.checkpoint=x.pt", "encoder.arch=mae_vit_tiny_patch16"],
                        "both set: set encoder.checkpoint=null"),
                       (["encoder.checkpoint=null"], "null needs encoder.arch"),
                       (["encoder.checkpoint=null", "encoder.arch=vit_nope"],
                        "encoder.arch=vit_nope: not a registered model"),
                       ([], r"required value\(s\) \['encoder.checkpoint'\]")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config(FinetuneConfig, [], [*base, *bad], complete=True)


def test_cli_reports_config_errors(capsys):
    assert main(["pretrain", "optim.weight_decy=0.1"]) == 2
    assert "optim.weight_decy" in capsys.readouterr().err


def schema_of(path: Path):
    """The schema a shipped config file is read with, from its folder and name."""
    from cls.config import FinetuneConfig, FrozenEvalConfig, LinprobeConfig
    from det.config import DetConfig
    from seg.config import SegConfig

    kind = path.parent.name
    if kind == "cls":
        return {"finetune": FinetuneConfig, "linprobe": LinprobeConfig, "frozen": FrozenEvalConfig,
                "overfit": FinetuneConfig}[path.stem.split("_")[0]]  # fmt: skip
    # ablate: the pretraining settings every run of ``crossmae ablate --config`` shares
    return {"pretrain": PretrainConfig, "ablate": PretrainConfig, "det": DetConfig,
            "seg": SegConfig}[kind]  # fmt: skip


ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_loads_with_its_schema(path: Path):
    """Every file under configs/ merges into its command's schema (its ``_base_`` chain too) and
    says how it is run; the values it leaves to the command line are the data and the output."""
    from omegaconf import OmegaConf

    text = path.read_text()
    assert "# Command:" in text and "# Hardware:" in text
    required = ["data.path=/imagenet/train"] if path.parent.name == "pretrain" else []
    cfg = load_config(schema_of(path), [path], required)
    missing = set(OmegaConf.missing_keys(cfg))
    allowed = {"encoder.checkpoint", "output_dir", "data.path", "data.train", "data.val",
               "data.root", "data.train_json", "data.train_images", "data.val_json",
               "data.val_images"}  # fmt: skip
    assert missing <= allowed, missing - allowed


def test_a_config_names_its_base_and_overrides_only_what_differs(tmp_path):
    base = REPO / "configs" / "det" / "mask_rcnn_vit_base_100ep.yaml"
    large = REPO / "configs" / "det" / "mask_rcnn_vit_large_100ep.yaml"
    from det.config import DetConfig

    b, l_ = load_config(DetConfig, [base]), load_config(DetConfig, [large])
    assert "_base_: mask_rcnn_vit_base_100ep.yaml" in large.read_text()
    assert (l_.model.drop_path_rate, l_.optim.layer_decay) == (0.4, 0.8)
    assert (l_.train.steps, l_.data.num_workers) == (b.train.steps, b.data.num_workers)  # inherited
    # a chain: base <- middle <- top, each overriding one value; a loop is an error
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 3\n  batch_size: 8\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\ntrain:\n  epochs: 4\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\noptim:\n  blr: 0.5\n")
    cfg = load_config(PretrainConfig, [tmp_path / "c.yaml"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.blr) == (4, 8, 0.5)
    (tmp_path / "a.yaml").write_text("_base_: c.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(PretrainConfig, [tmp_path / "c.yaml"])
    (tmp_path / "d.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, [tmp_path / "d.yaml"])


@pytest.mark.parametrize("value", ["0123", "no", "off", "1e3", "/tmp/my run #1", "[a, b]", "~"])
def test_a_text_setting_keeps_the_text_given(value):
    """A path or a name on the command line is the text typed, character for character: not
    YAML's reading of it (0123 an octal 83, no a False, '#1' a comment, ~ a null)."""
    from cls.config import FinetuneConfig

    assert load_config(PretrainConfig, [], [f"output_dir={value}"]).output_dir == value
    assert load_config(PretrainConfig, [], [f"data.path={value}"]).data.path == value
    cfg = load_config(FinetuneConfig, [], [f"data.train={value}", f"encoder.checkpoint={value}"])
    assert cfg.data.train == value and cfg.encoder.checkpoint == value


def test_empty_text_is_an_error_and_null_keeps_its_meaning():
    """An empty value (an unset shell variable) names its key; ``null`` is the one word for
    None (encoder.checkpoint=null: an untrained encoder); numbers and lists still read as YAML."""
    for setting in ("data.path=", "output_dir=", "data.path=  "):
        key = setting.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{key}= has no value .* leave {key} out"):
            load_config(PretrainConfig, [], [setting])
    assert load_config(PretrainConfig, [], ["output_dir=null"]).output_dir is None
    cfg = load_config(PretrainConfig, [], ["train.seed=7", "optim.blr=1e-3",
                                           "data.crop_scale=[0.3, 1]"])  # fmt: skip
    assert (cfg.train.seed, cfg.optim.blr, list(cfg.data.crop_scale)) == (7, 1e-3, [0.3, 1.0])


@pytest.mark.parametrize("setting", ["train.seed=[1,", "train.seed=*a", "model.kwargs={a: 1"])
def test_a_value_yaml_cannot_read_is_one_line_naming_it(setting, capsys):
    with pytest.raises(ConfigError, match="is not a value YAML can read"):
        load_config(PretrainConfig, [], [setting])
    assert main(["pretrain", setting, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(setting) in err and "Traceback" not in err
