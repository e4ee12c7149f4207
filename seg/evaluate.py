"""Segmentation inference and mIoU as mmseg 1.2.2's test pipeline and ``IoUMetric`` compute them:
the uint8 image resized with OpenCV to the training scale (times each test ratio), normalised,
slide inference (512 windows, stride 341), logits resized back to the image, one confusion matrix
summed over processes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossmae import distributed as du
from crossmae.config import ConfigError
from crossmae.data import normalize_pixels
from crossmae.engine import PRECISIONS
from crossmae.report import Progress

from .data import IGNORE, SegFolder, rescale_size, resize_u8
from .metrics import SegMetrics, per_class
from .model import slide_inference


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
    arguments), and ``per_class`` IoU / Acc by class name; each process takes its own shard and
    the confusion matrices are summed, so every image counts once."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(num_classes, IGNORE)
    shard = du.shard(len(folder), du.rank(), du.world_size())
    with Progress(len(shard), "segmentation inference") as bar:
        for i in shard:
            img, label, _ = folder[i]
            scores = segment(model, img, num_classes, **settings)
            metrics.update(scores.argmax(1)[0].cpu(), label)
            bar.update()
    metrics.all_reduce()
    model.train(was_training)
    result = metrics.compute()
    means = {k: result[k] for k in ("aAcc", "mIoU", "mAcc")}
    return {**means, "per_class": per_class(result, folder.spec.names())}


def eval_settings(cfg) -> dict:
    """``segment``'s keyword arguments from a ``SegConfig``."""
    e = cfg.eval
    return {"crop": cfg.data.crop, "stride": e.stride, "scale": tuple(cfg.data.scale),
            "ratios": tuple(e.ratios), "flip": e.flip, "mode": e.mode,
            "precision": PRECISIONS[e.precision]}  # fmt: skip
