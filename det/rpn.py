"""Region proposal network with detectron2's semantics (``modeling/anchor_generator.py``,
``modeling/proposal_generator/rpn.py`` and ``proposal_utils.py``), as ViTDet configures it:
one anchor size per pyramid level (32 ... 512), aspect ratios 0.5 / 1 / 2, fractional anchor
corners, a head of two 3x3 convolutions, top-k per level before a class-wise NMS over levels,
proposals clipped to each image's valid (unpadded) area, L1 box loss, and both losses summed
and divided by 256 x images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .structures import (
    BoxCoder,
    Matcher,
    batched_nms,
    clip_boxes,
    nonempty,
    pairwise_iou,
    subsample_labels,
)

Sampler = Callable[[torch.Tensor, int, float, int], tuple[torch.Tensor, torch.Tensor]]


class AnchorGenerator(nn.Module):
    """detectron2's ``DefaultAnchorGenerator``: per level, anchors of its size and each aspect
    ratio (w = sqrt(size^2 / ratio), h = ratio * w, centred on 0) shifted to every cell corner
    (offset 0) of the level's grid. float32, order (y, x, anchor).

    Args:
        sizes: one anchor size per level.
        aspect_ratios: height / width ratios shared by all levels.
        strides: each level's stride.
    """

    def __init__(self, sizes: list[float], aspect_ratios: list[float], strides: list[int]):
        super().__init__()
        self.strides = list(strides)
        cells = []
        for size in sizes:
            row = []
            for ratio in aspect_ratios:
                w = math.sqrt(size**2 / ratio)
                h = ratio * w
                row.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
            cells.append(torch.tensor(row, dtype=torch.float64).float())
        self.cells = cells  # (A, 4) per level
        self.num_anchors = len(aspect_ratios)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for feat, stride, cell in zip(features, self.strides, self.cells, strict=True):
            h, w = feat.shape[-2:]
            dev = feat.device
            xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=dev)
            ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=dev)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)  # (h*w, 4)
            out.append((shifts.view(-1, 1, 4) + cell.to(dev).view(1, -1, 4)).reshape(-1, 4))
        return out


class RPNHead(nn.Module):
    """detectron2's ``StandardRPNHead``: shared 3x3 convolutions with ReLU (``conv.conv{k}``),
    then a 1x1 objectness logit and 4 deltas per anchor.

    Args:
        channels: pyramid width.
        num_anchors: anchors per cell.
        num_convs: shared convolutions (ViTDet: 2).
    """

    def __init__(self, channels: int, num_anchors: int, num_convs: int = 2):
        super().__init__()
        self.conv = nn.Sequential()
        for k in range(num_convs):
            self.conv.add_module(f"conv{k}", nn.Conv2d(channels, channels, 3, padding=1))
            self.conv.add_module(f"relu{k}", nn.ReLU())
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list, list]:
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))  # (B, A, Hi, Wi)
            deltas.append(self.anchor_deltas(t))  # (B, A*4, Hi, Wi)
        return logits, deltas


def find_top_proposals(
    proposals: list[torch.Tensor],
    logits: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    *,
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    training: bool,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """detectron2's ``find_top_rpn_proposals``: the ``pre_nms_topk`` best anchors of each level,
    clipped to the image's valid area, empty ones dropped, NMS within each level, the best
    ``post_nms_topk`` kept. ``proposals[l]`` (B, R_l, 4), ``logits[l]`` (B, R_l); returns per
    image (boxes float32 (R, 4), logits (R,)) in decreasing logit order."""
    batch = torch.arange(len(image_sizes), device=proposals[0].device)
    top_boxes, top_logits, levels = [], [], []
    for lvl, (boxes_l, logits_l) in enumerate(zip(proposals, logits, strict=True)):
        k = min(pre_nms_topk, logits_l.shape[1])
        scores, idx = logits_l.topk(k, dim=1)  # (B, k)
        top_logits.append(scores)
        top_boxes.append(boxes_l[batch[:, None], idx])  # (B, k, 4)
        levels.append(torch.full((k,), lvl, dtype=torch.int64, device=scores.device))
    top_boxes, top_logits, levels = (
        torch.cat(top_boxes, 1),
        torch.cat(top_logits, 1),
        torch.cat(levels),
    )
    out = []
    for n, size in enumerate(image_sizes):
        boxes, scores, lvl = top_boxes[n], top_logits[n], levels
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not valid.all():
            if training:
                raise FloatingPointError("predicted proposal boxes or logits are not finite")
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes = clip_boxes(boxes, size)
        keep = nonempty(boxes, min_box_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, nms_thresh)[:post_nms_topk]
        out.append((boxes[keep], scores[keep]))
    return out


class RPN(nn.Module):
    """detectron2's ``RPN`` with ViTDet's settings.

    Args:
        channels: pyramid width.
        strides: the strides of the levels it reads (p2 ... p6).
        anchor_sizes: one anchor size per level.
        aspect_ratios: anchor aspect ratios.
        num_convs: shared head convolutions.
        pre_nms_topk, post_nms_topk: (training, testing) proposal counts.
        nms_thresh, min_box_size: proposal NMS IoU and minimum side.
        batch_size_per_image, positive_fraction: anchors sampled for the losses.
        iou_thresholds: anchor matching (negative below the first, positive from the second).
        smooth_l1_beta: 0 = L1 box loss (ViTDet).
    """

    def __init__(
        self,
        channels: int,
        strides: list[int],
        *,
        anchor_sizes: list[float],
        aspect_ratios: list[float] = (0.5, 1.0, 2.0),
        num_convs: int = 2,
        pre_nms_topk: tuple[int, int] = (2000, 1000),
        post_nms_topk: tuple[int, int] = (1000, 1000),
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
        smooth_l1_beta: float = 0.0,
    ):
        super().__init__()
        self.anchor_generator = AnchorGenerator(list(anchor_sizes), list(aspect_ratios), strides)
        self.rpn_head = RPNHead(channels, self.anchor_generator.num_anchors, num_convs)
        self.matcher = Matcher(list(iou_thresholds), [0, -1, 1], allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.pre_nms_topk, self.post_nms_topk = tuple(pre_nms_topk), tuple(post_nms_topk)
        self.nms_thresh, self.min_box_size = nms_thresh, min_box_size
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.smooth_l1_beta = smooth_l1_beta
        self.sampler: Sampler = subsample_labels  # replaceable, e.g. to replay recorded draws

    def forward(
        self,
        features: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        gt_boxes: list[torch.Tensor] | None = None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """Proposals per image (boxes, logits) and, with ``gt_boxes`` (training), the losses."""
        anchors = self.anchor_generator(features)
        logits, deltas = self.rpn_head(features)
        B = features[0].shape[0]
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]  # (B, Hi*Wi*A)
        deltas = [  # (B, Hi*Wi*A, 4)
            x.view(B, -1, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas
        ]
        losses = {}
        if gt_boxes is not None:
            losses = self.losses(anchors, logits, deltas, gt_boxes)
        with torch.no_grad():
            boxes = [
                self.box_coder.apply_deltas(d.reshape(-1, 4), a.repeat(B, 1)).view(B, -1, 4)
                for a, d in zip(anchors, deltas, strict=True)
            ]
            mode = 0 if self.training else 1
            proposals = find_top_proposals(
                boxes, [x.detach() for x in logits], image_sizes, nms_thresh=self.nms_thresh,
                pre_nms_topk=self.pre_nms_topk[mode], post_nms_topk=self.post_nms_topk[mode],
                min_box_size=self.min_box_size, training=self.training,
            )  # fmt: skip
        return proposals, losses

    def label_anchors(
        self, anchors: torch.Tensor, gt_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: anchor labels after sampling (1 positive, 0 negative, -1 unused) and the
        matched ground-truth box of every anchor."""
        matched, labels = self.matcher(pairwise_iou(gt_boxes, anchors))
        pos, neg = self.sampler(labels, self.batch_size_per_image, self.positive_fraction, 0)
        labels = torch.full_like(labels, -1)
        labels[pos], labels[neg] = 1, 0
        matched_boxes = gt_boxes[matched] if len(gt_boxes) else torch.zeros_like(anchors)
        return labels, matched_boxes

    def losses(self, anchors, logits, deltas, gt_boxes) -> dict[str, torch.Tensor]:
        anchors = torch.cat(anchors)  # (R, 4)
        labels, matched = zip(*(self.label_anchors(anchors, g) for g in gt_boxes), strict=True)
        labels = torch.stack(labels)  # (B, R)
        pos = labels == 1
        gt_deltas = torch.stack([self.box_coder.get_deltas(anchors, m) for m in matched])
        loc = box_regression_loss(torch.cat(deltas, 1)[pos], gt_deltas[pos], self.smooth_l1_beta)
        valid = labels >= 0
        cls = F.binary_cross_entropy_with_logits(
            torch.cat(logits, 1)[valid], labels[valid].to(torch.float32), reduction="sum"
        )
        normalizer = self.batch_size_per_image * len(gt_boxes)
        return {"loss_rpn_cls": cls / normalizer, "loss_rpn_loc": loc / normalizer}


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 (fvcore's ``smooth_l1_loss``); L1 when ``beta`` < 1e-5."""
    diff = torch.abs(pred - target)
    if beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum()
