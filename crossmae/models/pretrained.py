"""Pretrained models from checkpoints: rebuilding a pretraining model, the encoder-only export,
the encoder weights and settings of any supported file (ours, an encoder export, an official
release) and a task model built on them. Checkpoint files themselves are ``crossmae.checkpoint``
(no model building there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    ENCODER_FORMAT,
    PRETRAIN_FORMAT,
    describe_format,
    load_state_dict_strict,
    read_torch_file,
    unwrap,
)
from .crossmae import CrossMAE


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the pretraining model a checkpoint describes and load its weights strictly."""
    from . import create_model

    if ckpt.get("format") != PRETRAIN_FORMAT:
        raise ValueError(f"expected {describe_format(PRETRAIN_FORMAT)}, got "
                         f"{describe_format(ckpt.get('format'))}")  # fmt: skip
    model = create_model(ckpt["model_name"], **ckpt["model_config"])
    load_state_dict_strict(model, ckpt["model"], what=f"{ckpt['model_name']} checkpoint")
    return model


def encoder_export(model: nn.Module, *, model_name: str, extra: dict | None = None) -> dict:
    """Encoder-only checkpoint: timm / official-MAE key names under ``"encoder"``, the encoder's
    constructor settings under ``"encoder_config"`` (``VisionTransformer(**encoder_config)``)."""
    from ..version import __version__

    model = unwrap(model)
    return {
        "format": ENCODER_FORMAT,
        "version": __version__,
        "model_name": model_name,
        "encoder": {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()},
        "encoder_config": dict(model.encoder.config),
        **(extra or {}),
    }


def _encoder_config_of(model_name: str, model_config: dict[str, Any]) -> dict[str, Any]:
    from . import create_model

    with torch.device("meta"):  # the architecture only, no memory, no init cost
        return dict(create_model(model_name, **model_config).encoder.config)


def _check_official_arch(sd: dict, config: dict, arch: str, path) -> None:
    """An official file read as ``arch``: every tensor of the file's encoder has the shape that
    ``arch``'s encoder gives it, or an error naming both sizes."""
    from .sizes import size_of_state_dict
    from .vit import VisionTransformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VisionTransformer(**config).state_dict().items()}
    if all(tuple(v.shape) == shapes.get(k) for k, v in sd.items()) and len(sd) == len(shapes):
        return
    try:
        found = size_of_state_dict(sd)
        found = f"ViT-{found.name} ({found.embed_dim}-d, {found.depth} blocks)"
    except ValueError:
        found = "an encoder of another size"
    raise ValueError(f"{path} holds {found}, not the encoder of official_arch={arch} "
                     f"({config['embed_dim']}-d, {config['depth']} blocks, patch "
                     f"{config['patch_size']}): name the model it was trained as")  # fmt: skip


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
    ckpt = read_torch_file(path)
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
        from .official import official_to_ours
        from .registry import model_class

        kind = model_class(official_arch).kind

        ours = official_to_ours(ckpt["model"], kind=kind)
        sd = {k.removeprefix("encoder."): v for k, v in ours.items() if k.startswith("encoder.")}
        overrides = {"weight_fm": "norm.weight" not in sd} if kind == CrossMAE.kind else {}
        config = _encoder_config_of(official_arch, overrides)
        _check_official_arch(sd, config, official_arch, path)
        return sd, config
    raise ValueError(f"{path}: not a pretraining checkpoint, encoder export or official release")


WIDTHS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps")


def encoder_widths(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of an encoder config that a task backbone must share to take its weights."""
    return {k: config[k] for k in WIDTHS}


def encoder_of(source) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The weights and constructor settings of the encoder ``source`` (an ``EncoderSource``)
    names; the weights are None where it asks for the architecture untrained (``random_init``,
    or ``arch``: a registered model's encoder, which no file holds)."""
    if source.arch is not None:
        return None, _encoder_config_of(source.arch, dict(source.arch_settings))
    sd, config = load_pretrained_encoder(source.checkpoint, official_arch=source.official_arch)
    return (None if source.random_init else sd), config


def describe_source(source) -> str:
    """The encoder ``source`` names, in words (for logs and errors)."""
    if source.arch is not None:
        return f"an untrained {source.arch} encoder"
    return f"{source.checkpoint}{' (architecture only, untrained)' if source.random_init else ''}"


def model_on_encoder(source, build, vit, encoder=None) -> tuple[nn.Module, dict[str, Any]]:
    """A task model on the encoder ``source`` names (an ``EncoderSource``): ``build(encoder
    config)`` makes it, and ``vit(model)`` (its ViT backbone) receives the encoder's weights
    unless the source asks for it untrained. ``encoder``: ``encoder_of(source)`` when already
    read. Returns the model and the encoder config."""
    from .vit import grid_of

    sd, config = encoder or encoder_of(source)
    model = build(config)
    if sd is not None:
        vit(model).load_pretrained(sd, grid_of(config["img_size"], config["patch_size"]))
    return model, config


# ----------------------------------------------------------------------------- other frameworks
