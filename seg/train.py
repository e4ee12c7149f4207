"""UperNet training for semantic segmentation as mmsegmentation 1.2.2's MAE UperNet config
trains it: AdamW lr 1e-4, wd 0.05, layer-wise lr decay 0.65, LinearLR warmup over 1500
steps then PolyLR, batch 16 of 512 crops, SyncBN when distributed, cross entropy divided by
all pixels, auxiliary FCN loss x 0.4, fp16 AMP; mIoU by sliding-window inference in full
precision; ``--resume auto``.

    torchrun --nproc-per-node 8 -m crossmae seg train \
        --config configs/seg/upernet_vit_base_ade20k_160k.yaml data.root=/data/ADEChallengeData \
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/seg_b
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from crossmae import distributed as du
from crossmae.checkpoint import seed_all
from crossmae.config import ConfigError, to_plain
from crossmae.data import normalize_pixels
from crossmae.engine import (
    PRECISIONS,
    Hooks,
    check_precision,
    finish_task,
    open_run,
    task_engine,
    task_loader,
)
from crossmae.models.layers import vit_layer_id
from crossmae.models.pretrained import encoder_widths, model_on_encoder
from crossmae.optim import linear_then_poly_lr_at, param_groups, poly_lr_at

from .data import (
    ADE20K,
    CAMVID,
    IGNORE,
    LabelSpec,
    SegAugment,
    SegFolder,
    rescale_size,
    resize_u8,
)
from .metrics import SegMetrics, format_table
from .model import SegViT, UperNet, slide_inference, to_sync_batchnorm

log = logging.getLogger("crossmae")
SEG_FORMAT = "crossmae-seg-v2"  # v2: mmseg's module names below the backbone
LR_SCHEDULES = {"mmseg1": linear_then_poly_lr_at, "mmseg0": poly_lr_at}


def label_spec(cfg: DictConfig) -> LabelSpec:
    """The labels of a ``SegConfig.data`` section's dataset."""
    if cfg.dataset == "ade20k":
        return ADE20K
    if cfg.dataset == "camvid":
        return CAMVID
    if cfg.dataset == "custom":
        return LabelSpec(cfg.num_classes, cfg.ignore_value, cfg.reduce_zero_label,
                         ignore_other_labels=cfg.ignore_other_labels)  # fmt: skip
    raise ConfigError(f"dataset must be ade20k, camvid or custom, got {cfg.dataset!r}")


def build_segmenter(cfg: DictConfig, num_classes: int, encoder_config: dict) -> UperNet:
    """The UperNet a ``SegConfig`` describes on an encoder of ``encoder_config``, untrained."""
    m = cfg.model
    patch = m.patch_size or encoder_config["patch_size"]
    if cfg.data.crop % patch:
        raise ConfigError(f"data.crop={cfg.data.crop} is not a multiple of the patch size {patch}")
    backbone = SegViT(
        img_size=cfg.data.crop,
        patch_size=patch,
        **encoder_widths(encoder_config),
        drop_path_rate=m.drop_path_rate,
        out_indices=m.out_indices,
    )
    return UperNet(backbone, num_classes, channels=m.channels, aux_channels=m.aux_channels,
                   pool_scales=tuple(m.pool_scales))  # fmt: skip


def pretrained_segmenter(cfg: DictConfig, num_classes: int) -> tuple[UperNet, dict]:
    """The segmenter on the configured encoder checkpoint (its weights in the backbone, unless
    ``encoder.random_init``); returns it and the encoder's settings."""
    return model_on_encoder(
        cfg.encoder, lambda enc: build_segmenter(cfg, num_classes, enc), lambda m: m.backbone
    )


def rescaled(img: torch.Tensor, scale, ratio: float = 1.0) -> torch.Tensor:
    """uint8 (3, H, W) resized as mmseg's test pipeline resizes it (``Resize(scale * ratio,
    keep_ratio=True)``: OpenCV bilinear on uint8)."""
    H, W = img.shape[-2:]
    size = rescale_size(H, W, (int(scale[0] * ratio), int(scale[1] * ratio)))
    out = resize_u8(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), size)
    return torch.from_numpy(out).permute(2, 0, 1)


@torch.no_grad()
def segment(
    model: nn.Module,
    img: torch.Tensor,
    num_classes: int,
    *,
    crop: int,
    stride: int,
    scale=None,
    ratios=(1.0,),
    flip: bool = False,
    mode: str = "slide",
    precision: torch.dtype | None = None,
) -> torch.Tensor:
    """Class scores (1, C, H, W) of one uint8 image (3, H, W) as mmseg's test pipeline makes
    them: resized on uint8 to the training ``scale`` (times each of ``ratios``), normalised,
    slide inference (``mode="whole"``: one crop x crop input instead), logits resized back to
    the image. One ratio without flip gives the logits; several ratios or ``flip`` (multi-scale
    + flip testing) the average of their softmax. ``precision``: an autocast dtype, None = full
    precision (mmseg's)."""
    if mode not in ("slide", "whole"):
        raise ConfigError(f"eval_mode must be 'slide' or 'whole', got {mode!r}")
    p = next(model.parameters())
    H, W = img.shape[-2:]
    scores = torch.zeros(1, num_classes, H, W, device=p.device, dtype=p.dtype)
    for r in ratios:
        u8 = rescaled(img, scale, r) if scale is not None else img
        x = normalize_pixels(u8.to(p.device), dtype=p.dtype)[None]
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            with torch.autocast(p.device.type, dtype=precision, enabled=precision is not None):
                if mode == "slide":
                    logits = slide_inference(model, xi, num_classes, crop=crop, stride=stride)
                else:
                    xw = F.interpolate(xi, size=(crop, crop), mode="bilinear", align_corners=False)
                    logits = model(xw)["logits"]
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits.to(p.dtype), size=(H, W), mode="bilinear",
                                   align_corners=False)  # fmt: skip
            scores += logits if len(ratios) == 1 and not flip else logits.softmax(dim=1)
    return scores


def evaluate_segmenter(model: nn.Module, folder: SegFolder, num_classes: int, **settings) -> dict:
    """mIoU / mAcc / aAcc over ``folder`` with ``segment``'s scores (``settings``: its keyword
    arguments); each process takes its own shard and the confusion matrices are summed, so every
    image counts once."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(num_classes, IGNORE)
    for i in du.shard(len(folder), du.rank(), du.world_size()):
        img, label, _ = folder[i]
        scores = segment(model, img, num_classes, **settings)
        metrics.update(scores.argmax(1)[0].cpu(), label)
    metrics.all_reduce()
    model.train(was_training)
    return metrics.compute()


def eval_settings(cfg: DictConfig) -> dict:
    """``segment``'s keyword arguments from a ``SegConfig``."""
    e = cfg.eval
    return {"crop": cfg.data.crop, "stride": e.stride, "scale": tuple(cfg.data.scale),
            "ratios": tuple(e.ratios), "flip": e.flip, "mode": e.mode,
            "precision": PRECISIONS[e.precision]}  # fmt: skip


def seg_param_groups(model: UperNet, cfg: DictConfig) -> list[dict]:
    """mmseg's ``LayerDecayOptimizerConstructor`` (``cfg``: the ``optim`` section): lr scale
    ``layer_decay ** (depth + 1 - i)`` for backbone depth i (embeddings 0, block k -> k + 1,
    everything else depth + 1); no weight decay on 1-d parameters and biases; ``pos_embed`` /
    ``cls_token`` decayed unless ``decay_pos_embed`` is false (mmseg's check misses their
    prefix)."""
    vit, prefix = model.backbone, "backbone."
    exempt = set() if cfg.decay_pos_embed else {"backbone.pos_embed", "backbone.cls_token"}
    return param_groups(
        model, cfg.weight_decay, layer_decay=cfg.layer_decay, num_layers=vit.depth,
        layer_id=lambda n: vit_layer_id(n.removeprefix(prefix), vit.depth) if n.startswith(prefix)
        else vit.depth + 1,
        no_decay_names=exempt,
    )  # fmt: skip


def segmentation_losses(
    out: dict[str, torch.Tensor], labels: torch.Tensor, *, aux_weight: float,
    avg_non_ignore: bool = False,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """mmseg's ``loss_by_feat`` of both heads: logits bilinearly resized to the labels, cross
    entropy over the labelled pixels divided by all pixels (``avg_non_ignore=False``; true: by
    the labelled ones), the auxiliary head's times ``aux_weight``; ``acc_seg`` as mmseg's
    ``accuracy`` (percent of labelled pixels)."""
    losses = {}
    for key, name, weight in (("logits", "decode", 1.0), ("aux_logits", "aux", aux_weight)):
        logits = F.interpolate(out[key].float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)  # fmt: skip
        per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
        valid = labels != IGNORE
        denom = valid.sum().clamp(min=1) if avg_non_ignore else labels.numel()
        losses[f"{name}_loss_ce"] = weight * per_pixel.sum() / denom
        with torch.no_grad():
            eps = torch.finfo(torch.float32).eps
            correct = (logits.argmax(1) == labels)[valid].sum() + eps
            losses[f"{name}_acc_seg"] = correct * 100.0 / (valid.sum() + eps)
    return losses


def train_segmenter(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Train per ``cfg`` (a ``config.SegConfig``); returns the final metrics."""
    check_precision(cfg.eval.precision, "eval.precision")
    spec = label_spec(cfg.data)
    d = cfg.data
    train_folder = SegFolder(d.root, d.train_split, spec, skip_unreadable=True)
    val_folder = SegFolder(d.root, d.val_split, spec)
    device = open_run(cfg, resume, cfg.output_dir)
    out = Path(cfg.output_dir)

    torch.manual_seed(cfg.train.seed)
    model, encoder_config = pretrained_segmenter(cfg, spec.num_classes)
    if du.world_size() > 1:  # mmseg's SyncBN: batch statistics over every process's crops
        model = to_sync_batchnorm(model, device)
    model.to(device)
    seed_all(cfg.train.seed + du.rank())  # this process's streams (drop path, augmentations)
    data = SegAugment(train_folder, d.crop, tuple(d.scale), tuple(d.ratio_range), d.cat_max_ratio)
    sampler, loader, accum = task_loader(data, cfg, device)
    opt = torch.optim.AdamW(seg_param_groups(model, cfg.optim), lr=cfg.optim.lr,
                            fused=device.type == "cuda")  # fmt: skip

    def evaluate(step: int) -> dict:
        m = evaluate_segmenter(model, val_folder, spec.num_classes, **eval_settings(cfg))
        engine.record({"step": step, "mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"]},
                      "eval")  # fmt: skip
        log.info("step %d: mIoU %.2f mAcc %.2f aAcc %.2f", step, m["mIoU"], m["mAcc"], m["aAcc"])
        return m

    def inputs(batch) -> dict:
        imgs, labels = batch
        return {"imgs": imgs.to(device, non_blocking=True),
                "labels": labels.to(device, non_blocking=True)}  # fmt: skip

    def losses(forward, imgs, labels) -> dict[str, torch.Tensor]:
        parts = segmentation_losses(forward(imgs), labels, aux_weight=cfg.model.aux_weight,
                                    avg_non_ignore=cfg.model.loss_avg_non_ignore)  # fmt: skip
        return {**parts, "loss": parts["decode_loss_ce"] + parts["aux_loss_ce"]}

    def summary(result: dict) -> dict:
        if not result["interrupted"] and du.rank() == 0:
            (out / "per_class.md").write_text(format_table(result["metrics"], spec.names()) + "\n")
        return {}

    fields = {"format": SEG_FORMAT, "encoder_config": encoder_config,
              "num_classes": spec.num_classes, "config": to_plain(cfg)}  # fmt: skip
    o = cfg.optim
    engine = task_engine(
        cfg, model, opt, out=out, device=device, sampler=sampler, loader=loader, accum=accum,
        steps=cfg.train.steps, inputs=inputs, losses=losses,
        lr_at=lambda s: LR_SCHEDULES[o.lr_schedule](
            s, base_lr=o.lr, total_steps=cfg.train.steps, warmup_steps=o.warmup_steps),
        hooks=Hooks(evaluate=evaluate, checkpoint_fields=lambda: fields),
        eval_every=cfg.eval.every_steps,
    )  # fmt: skip
    engine.resume(resume)
    log.info("UperNet: %d classes, %d training images, batch %d (%d processes x %d accumulation),"
             " %d steps", spec.num_classes, len(train_folder), cfg.train.batch_size,
             du.world_size(), accum, cfg.train.steps)  # fmt: skip
    return finish_task(engine, out, summary)
