"""Segmentation inference and mIoU as mmseg 1.2.2's test pipeline and ``IoUMetric`` compute them:
the uint8 image resized with OpenCV to the training scale (times each test ratio), normalised,
slide inference (512 windows, stride 341), logits resized back to the image, one confusion matrix
summed over processes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossmae.config import ConfigError
from crossmae.data import normalize_pixels
from crossmae.evaluation import DatasetEvaluator, first_item, inference_on_dataset
from crossmae.precision import autocast_dtype

from .data import IGNORE, SegFolder, rescale_size, resize_u8
from .metrics import SegMetrics, per_class


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of mmseg's ``slide_inference`` windows over a (height, width) image at
    least ``crop`` on each side, in its order: every ``stride`` pixels, the last flush with the
    border."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    ys = [max(min(r * stride + crop, height) - crop, 0) for r in range(rows)]
    xs = [max(min(c * stride + crop, width) - crop, 0) for c in range(cols)]
    return [(y, x) for y in ys for x in xs]


@torch.no_grad()
def slide_inference(
    model: nn.Module, img: torch.Tensor, num_classes: int, crop: int = 512, stride: int = 341
) -> torch.Tensor:
    """Logits (B, C, H, W) of an image of any size by overlapping ``crop`` windows every
    ``stride`` pixels (``slide_windows``), each window's logits resized to the crop and averaged
    where they overlap (mmseg's ``slide_inference``); an image smaller than the crop is padded
    with zeros to it first."""
    B, _, H, W = img.shape
    img = F.pad(img, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    Hp, Wp = img.shape[-2:]
    out = img.new_zeros(B, num_classes, Hp, Wp)
    count = img.new_zeros(1, 1, Hp, Wp)
    for y, x in slide_windows(Hp, Wp, crop, stride):
        logits = model(img[:, :, y : y + crop, x : x + crop])["logits"].to(out.dtype)
        out[:, :, y : y + crop, x : x + crop] += F.interpolate(
            logits, size=(crop, crop), mode="bilinear", align_corners=False
        )
        count[:, :, y : y + crop, x : x + crop] += 1
    return (out / count)[:, :, :H, :W]


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
    precision: str = "fp32",
) -> torch.Tensor:
    """Class scores (1, C, H, W) of one uint8 image (3, H, W) as mmseg's test pipeline makes
    them: resized on uint8 to the training ``scale`` (times each of ``ratios``), normalised,
    slide inference (``mode="whole"``: one crop x crop input instead), logits resized back to
    the image. One ratio without flip gives the logits; several ratios or ``flip`` (multi-scale
    + flip testing) the average of their softmax. ``precision``: the model's autocast (a name of
    ``crossmae.precision.PRECISIONS``; fp32: mmseg's)."""
    if mode not in ("slide", "whole"):
        raise ConfigError(f"eval_mode must be 'slide' or 'whole', got {mode!r}")
    dtype = autocast_dtype(precision, "eval.precision")
    p = next(model.parameters())
    H, W = img.shape[-2:]
    scores = torch.zeros(1, num_classes, H, W, device=p.device, dtype=p.dtype)
    for r in ratios:
        u8 = rescaled(img, scale, r) if scale is not None else img
        x = normalize_pixels(u8.to(p.device), dtype=p.dtype)[None]
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            with torch.autocast(p.device.type, dtype=dtype, enabled=dtype is not None):
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


class SlideInference(nn.Module):
    """``segment`` as a module: one uint8 image (3, H, W) -> its class scores (1, C, H, W), so
    that the evaluation loop runs it as any model (its autocast, not ``segment``'s)."""

    def __init__(self, model: nn.Module, num_classes: int, **settings):
        super().__init__()
        self.model, self.num_classes, self.settings = model, num_classes, settings

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return segment(self.model, img, self.num_classes, **self.settings)


class SegEvaluator(DatasetEvaluator):
    """mIoU / mAcc / aAcc of per-pixel class scores against ``(image, label, index)`` items,
    and ``per_class`` IoU / Acc by class name: one confusion matrix, summed over processes."""

    desc = "segmentation inference"

    def __init__(self, num_classes: int, names: list[str]):
        self.num_classes, self.names = num_classes, names

    def reset(self) -> None:
        self.metrics = SegMetrics(self.num_classes, IGNORE)

    def model_inputs(self, batch, device: torch.device) -> torch.Tensor:
        return batch[0]  # uint8 on the host: resized there with OpenCV, as mmseg does

    def process(self, inputs, outputs: torch.Tensor) -> None:
        self.metrics.update(outputs.argmax(1)[0].cpu(), inputs[1])

    def part(self) -> torch.Tensor:
        return self.metrics.cm

    def combine(self, parts: list) -> None:
        self.metrics.cm = sum(parts)

    def evaluate(self) -> dict:
        result = self.metrics.compute()
        means = {k: result[k] for k in ("aAcc", "mIoU", "mAcc")}
        return {**means, "per_class": per_class(result, self.names)}


def evaluate_segmenter(model: nn.Module, folder: SegFolder, num_classes: int, *,
                       precision: str = "fp32", **settings) -> dict:  # fmt: skip
    """``SegEvaluator``'s metrics of ``model`` over ``folder`` with ``segment``'s scores
    (``settings``: its keyword arguments) at ``precision`` (fp32: mmseg's)."""
    return inference_on_dataset(SlideInference(model, num_classes, **settings), folder,
                                SegEvaluator(num_classes, folder.spec.names()),
                                precision=precision, collate_fn=first_item)  # fmt: skip


def eval_settings(cfg) -> dict:
    """``segment``'s keyword arguments from a ``SegConfig``."""
    e = cfg.eval
    return {"crop": cfg.data.crop, "stride": e.stride, "scale": tuple(cfg.data.scale),
            "ratios": tuple(e.ratios), "flip": e.flip, "mode": e.mode,
            "precision": e.precision}  # fmt: skip
