"""crossmae convert: official <-> ours round trips are exact; our encoder loads strictly into
timm's ViT with the same features; the MAE-release and mmseg layouts."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from test_parity import FIXTURES

from crossmae.checkpoint import PRETRAIN_FORMAT, load_checkpoint, save_atomic
from crossmae.cli import main
from crossmae.models import VisionTransformer, create_model
from crossmae.models.official import model_kwargs_from_official
from seg.export import to_mmseg


def convert_main(argv: list[str]) -> int:
    return main(["convert", *argv])


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
            decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=2)  # fmt: skip


def ours_checkpoint(path, name="crossmae_vit_base_patch16", **overrides):
    torch.manual_seed(0)
    config = {**TINY, **overrides}
    model = create_model(name, **config)
    save_atomic(
        {"format": PRETRAIN_FORMAT, "model_name": name, "model_config": config,
         "model": model.state_dict()},
        path,
    )  # fmt: skip
    return model


@pytest.mark.parametrize("kind", sorted(FIXTURES))
def test_official_to_ours_to_official_is_exact(kind, shared_dir, tmp_path):
    data = torch.load(shared_dir / "fixtures" / FIXTURES[kind], weights_only=True)
    torch.save({"model": data["state_dict"]}, tmp_path / "official.pth")
    settings = model_kwargs_from_official(data["model"], kind=kind)
    arch = f"{kind}_vit_base_patch16"
    sets = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    argv = ["from-official", str(tmp_path / "official.pth"), str(tmp_path / "ours.pt"),
            "--arch", arch, *sets]  # fmt: skip
    assert convert_main(argv) == 0
    ours = load_checkpoint(tmp_path / "ours.pt")
    assert ours["model_config"] == settings
    assert convert_main(["to-official", str(tmp_path / "ours.pt"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert back.keys() == data["state_dict"].keys()
    # renamed and copied, never computed: the file's own bits on any machine
    assert all(torch.equal(back[k], v) for k, v in data["state_dict"].items())
    assert all(v.dtype == torch.float64 for v in back.values() if v.is_floating_point())


def test_from_official_with_the_wrong_architecture_names_the_keys(shared_dir, tmp_path, capsys):
    data = torch.load(shared_dir / "fixtures" / FIXTURES["mae"], weights_only=True)
    torch.save({"model": data["state_dict"]}, tmp_path / "official.pth")
    settings = {**model_kwargs_from_official(data["model"], kind="mae"), "depth": 3}
    sets = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    argv = ["from-official", str(tmp_path / "official.pth"), str(tmp_path / "o.pt"),
            "--arch", "mae_vit_base_patch16", *sets]  # fmt: skip
    assert convert_main(argv) == 2
    assert "blocks.2" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("name, sizes", [
    ("crossmae_vit_tiny_patch8", {"img_size": 64, "decoder_depth": 4}),  # the main job's model
    ("mae_vit_tiny_patch16", {"img_size": 32, "depth": 3, "decoder_depth": 2}),
])  # fmt: skip
def test_from_official_reads_the_sizes_the_file_says(name, sizes, tmp_path, capsys):
    """The round trip of a model whose sizes differ from its name's defaults needs no
    settings: image size, depths and widths are read from the state dict, and said."""
    torch.manual_seed(0)
    model = create_model(name, **sizes)
    save_atomic({"format": PRETRAIN_FORMAT, "model_name": name, "model_config": sizes,
                 "model": model.state_dict()}, tmp_path / "ours.pt")  # fmt: skip
    assert convert_main(["to-official", str(tmp_path / "ours.pt"), str(tmp_path / "o.pth")]) == 0
    argv = ["from-official", str(tmp_path / "o.pth"), str(tmp_path / "back.pt"), "--arch", name]
    assert convert_main(argv) == 0
    said = " ".join(f"{k}={v}" for k, v in sizes.items())
    assert f"read from the file: {said}" in capsys.readouterr().out
    back = load_checkpoint(tmp_path / "back.pt")
    assert back["model_config"] == sizes
    # copied and renamed in this run, never computed: bit-equal to the weights written here
    assert all(torch.equal(back["model"][k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("weight_fm", [True, False])
def test_timm_export_loads_strictly_and_gives_the_same_features(weight_fm, tmp_path):
    model = ours_checkpoint(tmp_path / "ours.pt", weight_fm=weight_fm)
    assert convert_main(["to-timm", str(tmp_path / "ours.pt"), str(tmp_path / "timm.pth")]) == 0
    call = json.loads((tmp_path / "timm.pth.json").read_text())
    sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    ref = timm.create_model(**call)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    ours = model.encoder.eval()
    assert torch.allclose(ref.eval().forward_features(x), ours.forward_features(x), atol=1e-5)
    # and back: the timm state dict loads strictly into our encoder, tensor for tensor
    again = VisionTransformer(**ours.config)
    again.load_state_dict(ref.state_dict(), strict=True)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_mae_release_and_mmseg_layouts(tmp_path):
    model = ours_checkpoint(tmp_path / "ours.pt", name="mae_vit_base_patch16")
    encoder_sd = model.encoder.state_dict()
    assert convert_main(["to-mae", str(tmp_path / "ours.pt"), str(tmp_path / "mae.pth")]) == 0
    mae = torch.load(tmp_path / "mae.pth", weights_only=True)
    assert list(mae) == ["model"] and mae["model"].keys() == encoder_sd.keys()
    # ViTDet runs at stride 16: another patch size is resampled to it, the rest kept as it is
    VisionTransformer(**{**model.encoder.config, "patch_size": 16}).load_state_dict(
        mae["model"], strict=True
    )
    assert all(torch.equal(mae["model"][k], v) for k, v in encoder_sd.items()
               if k not in ("patch_embed.proj.weight", "pos_embed"))  # fmt: skip
    assert convert_main(["to-mmseg", str(tmp_path / "ours.pt"), str(tmp_path / "mm.pth")]) == 0
    mm = torch.load(tmp_path / "mm.pth", weights_only=True)
    expected = to_mmseg(encoder_sd)
    assert mm.keys() == expected.keys() and all(torch.equal(mm[k], expected[k]) for k in mm)
