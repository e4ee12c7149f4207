"""Box and mask heads with detectron2's semantics (``modeling/poolers.py``,
``modeling/roi_heads/{roi_heads,box_head,fast_rcnn,mask_head}.py``), as ViTDet configures them:
ROIAlignV2 (aligned) pooling with detectron2's level assignment, a box head of 4 convolutions
with LayerNorm + 1 fc, a class-specific box predictor with background last, 512 sampled RoIs per
image at 25 % foreground (ground truth appended to the proposals), L1 box loss divided by the
sampled count, a mask head of 4 convolutions with LayerNorm + deconvolution, mask targets
rasterised from the ground-truth polygons inside each RoI.

Module and parameter names are detectron2's (``box_head.conv1``, ``box_predictor.cls_score``,
``mask_head.mask_fcn1``, ``mask_head.predictor``, ...): a detectron2 state dict loads as it is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .backbone import ConvNorm, msra_fill_
from .rpn import Sampler, box_regression_loss
from .structures import (
    BoxCoder,
    Matcher,
    Polygons,
    batched_nms,
    box_area,
    clip_boxes,
    pairwise_iou,
    rasterize_polygons_within_box,
    subsample_labels,
)

TEST_SCORE_THRESH = 0.05  # detectron2's ROI_HEADS.SCORE_THRESH_TEST: kept are scores above it


class ROIPooler(nn.Module):
    """Multi-level ROIAlignV2 (``aligned=True``, adaptive sampling): a box of side s goes to
    level floor(4 + log2(s / 224 + 1e-8)), clamped to the pooled levels (detectron2's
    ``assign_boxes_to_levels``).

    Args:
        output_size: pooled side (7 boxes, 14 masks).
        strides: strides of the pooled levels (4, 8, 16, 32).
    """

    def __init__(self, output_size: int, strides: list[int]):
        super().__init__()
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(-math.log2(self.scales[0]))
        self.max_level = int(-math.log2(self.scales[-1]))

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """``boxes``: float32 (R_i, 4) per image -> (sum R_i, C, S, S)."""
        all_boxes = torch.cat(boxes)
        index = torch.repeat_interleave(
            torch.arange(len(boxes), dtype=all_boxes.dtype, device=all_boxes.device),
            torch.tensor([len(b) for b in boxes], device=all_boxes.device),
            output_size=len(all_boxes),  # known: no device-to-host read
        )
        rois = torch.cat([index[:, None], all_boxes], dim=1)  # (R, 5): image, x1, y1, x2, y2
        sizes = torch.sqrt(box_area(all_boxes))
        level = torch.floor(4 + torch.log2(sizes / 224 + 1e-8))
        level = level.clamp(self.min_level, self.max_level).to(torch.int64) - self.min_level
        x0 = features[0]
        out = x0.new_zeros(len(rois), x0.shape[1], self.output_size, self.output_size)
        for lvl, (feat, scale) in enumerate(zip(features, self.scales, strict=True)):
            idx = torch.nonzero(level == lvl, as_tuple=True)[0]
            pooled = roi_align(feat, rois[idx].to(feat.dtype), self.output_size,
                               spatial_scale=scale, sampling_ratio=0, aligned=True)  # fmt: skip
            out.index_put_((idx,), pooled.to(out.dtype))
        return out


class BoxHead(nn.Sequential):
    """detectron2's ``FastRCNNConvFCHead``: 3x3 convolutions with LayerNorm and ReLU
    (``conv{k}``), flatten, fully connected layers with ReLU (``fc{k}``).

    Args:
        channels, pooled: input channels and side.
        conv_dims: convolution widths (ViTDet: 4 x 256).
        fc_dims: fc widths (ViTDet: 1024).
    """

    def __init__(self, channels: int, pooled: int, conv_dims: list[int], fc_dims: list[int]):
        super().__init__()
        dim = channels
        for k, d in enumerate(conv_dims):
            self.add_module(f"conv{k + 1}", ConvNorm(dim, d, 3, padding=1, relu=True))
            dim = d
        dim = dim * pooled * pooled
        for k, d in enumerate(fc_dims):
            if k == 0:
                self.add_module("flatten", nn.Flatten())
            fc = nn.Linear(dim, d)
            nn.init.kaiming_uniform_(fc.weight, a=1)  # detectron2's c2_xavier_fill
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{k + 1}", fc)
            self.add_module(f"fc_relu{k + 1}", nn.ReLU())
            dim = d
        self.out_dim = dim


class BoxPredictor(nn.Module):
    """detectron2's ``FastRCNNOutputLayers``: ``cls_score`` (K + 1 logits, background last) and
    ``bbox_pred`` (4 deltas per class)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """detectron2's ``MaskRCNNConvUpsampleHead``: 3x3 convolutions with LayerNorm and ReLU
    (``mask_fcn{k}``), a 2x deconvolution with ReLU, a 1x1 ``predictor`` of one mask per class.

    Args:
        channels: input channels.
        conv_dims: convolution widths (ViTDet: 4 x 256).
        deconv_dim: deconvolution width (256).
        num_classes: K.
    """

    def __init__(self, channels: int, conv_dims: list[int], deconv_dim: int, num_classes: int):
        super().__init__()
        dim = channels
        for k, d in enumerate(conv_dims):
            self.add_module(f"mask_fcn{k + 1}", ConvNorm(dim, d, 3, padding=1, relu=True))
            dim = d
        self.deconv = nn.ConvTranspose2d(dim, deconv_dim, 2, 2)
        self.deconv_relu = nn.ReLU()
        self.predictor = nn.Conv2d(deconv_dim, num_classes, 1)
        msra_fill_(self.deconv)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)


class ROIHeads(nn.Module):
    """detectron2's ``StandardROIHeads`` with a box and a mask branch.

    Args:
        channels: pyramid width.
        strides: strides of the pooled levels (4, 8, 16, 32).
        num_classes: K (no background).
        box_conv_dims, box_fc_dims, mask_conv_dims, mask_deconv_dim: head widths.
        batch_size_per_image, positive_fraction: RoIs sampled per training image.
        iou_threshold: foreground IoU.
        score_thresh, nms_thresh, detections_per_image: test-time filtering.
        smooth_l1_beta: 0 = L1 box loss (ViTDet).
    """

    def __init__(
        self,
        channels: int,
        strides: list[int],
        num_classes: int,
        *,
        box_conv_dims: list[int],
        box_fc_dims: list[int],
        mask_conv_dims: list[int],
        mask_deconv_dim: int,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        score_thresh: float = TEST_SCORE_THRESH,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        smooth_l1_beta: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.box_pooler = ROIPooler(7, strides)
        self.box_head = BoxHead(channels, 7, list(box_conv_dims), list(box_fc_dims))
        self.box_predictor = BoxPredictor(self.box_head.out_dim, num_classes)
        self.mask_pooler = ROIPooler(14, strides)
        self.mask_head = MaskHead(channels, list(mask_conv_dims), mask_deconv_dim, num_classes)
        self.matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_image = detections_per_image
        self.smooth_l1_beta = smooth_l1_beta
        self.sampler: Sampler = subsample_labels  # replaceable, e.g. to replay recorded draws

    # ------------------------------------------------------------------------- training
    def sample_proposals(
        self, proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image: ground truth appended to the proposals, matched, sampled. Returns the
        sampled boxes, their classes (K = background) and matched ground-truth indices."""
        boxes = torch.cat([proposals, gt_boxes])
        matched, match_labels = self.matcher(pairwise_iou(gt_boxes, boxes))
        if gt_classes.numel():
            classes = gt_classes[matched]
            classes[match_labels == 0] = self.num_classes
            classes[match_labels == -1] = -1
        else:
            classes = torch.full_like(matched, self.num_classes)
        fg, bg = self.sampler(classes, self.batch_size_per_image, self.positive_fraction,
                              self.num_classes)  # fmt: skip
        idx = torch.cat([fg, bg])
        return boxes[idx], classes[idx], matched[idx]

    def losses(
        self,
        features: list[torch.Tensor],
        proposals: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
        gt_classes: list[torch.Tensor],
        gt_polygons: list[list[Polygons]],
    ) -> dict[str, torch.Tensor]:
        boxes, classes, matched = zip(
            *(self.sample_proposals(p, b, c) for p, b, c in zip(proposals, gt_boxes, gt_classes,
                                                               strict=True)), strict=True
        )  # fmt: skip
        # box branch
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(features, list(boxes))))
        all_classes = torch.cat(classes)
        loss_cls = F.cross_entropy(scores, all_classes, reduction="mean")
        fg = torch.nonzero((all_classes >= 0) & (all_classes < self.num_classes), as_tuple=True)[0]
        # the regression target of a RoI is its matched ground truth (the RoI itself without one)
        targets = torch.cat([g[m] if len(g) else b for g, m, b in zip(gt_boxes, matched, boxes,
                                                                      strict=True)])  # fmt: skip
        fg_deltas = deltas.view(-1, self.num_classes, 4)[fg, all_classes[fg]]
        gt_deltas = self.box_coder.get_deltas(torch.cat(boxes)[fg], targets[fg])
        loss_box = box_regression_loss(fg_deltas, gt_deltas, self.smooth_l1_beta)
        loss_box = loss_box / max(all_classes.numel(), 1.0)
        # mask branch, on the foreground RoIs
        fg_boxes, fg_classes, mask_targets = [], [], []
        for b, c, m, polys in zip(boxes, classes, matched, gt_polygons, strict=True):
            keep = (c != -1) & (c != self.num_classes)
            fg_boxes.append(b[keep])
            fg_classes.append(c[keep])
            mask_targets += [
                rasterize_polygons_within_box(polys[g], np.asarray(box, np.float32), 28)
                for g, box in zip(m[keep].tolist(), b[keep].tolist(), strict=True)
            ]
        logits = self.mask_head(self.mask_pooler(features, fg_boxes))
        if mask_targets:
            fg_classes = torch.cat(fg_classes)
            logits = logits[torch.arange(len(fg_classes), device=logits.device), fg_classes]
            target = torch.from_numpy(np.stack(mask_targets))  # one tensor: one host copy
            target = target.to(device=logits.device, dtype=torch.float32)
            loss_mask = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
        else:
            loss_mask = logits.sum() * 0
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}

    # ------------------------------------------------------------------------- inference
    def inference(
        self,
        features: list[torch.Tensor],
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image in input coordinates (clipped to the valid area): ``boxes``
        float32 (N, 4), ``scores`` (N,), ``classes`` (N,) 0-based, ``mask_probs`` (N, 28, 28)
        of the predicted class, ``proposal_index`` (N,)."""
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(features, proposals)))
        boxes = self.box_coder.apply_deltas(deltas, torch.cat(proposals))  # (R, 4K)
        probs = F.softmax(scores, dim=-1)
        counts = [len(p) for p in proposals]
        results = [
            self.detect(b, p, size)
            for b, p, size in zip(boxes.split(counts), probs.split(counts), image_sizes,
                                  strict=True)
        ]  # fmt: skip
        logits = self.mask_head(self.mask_pooler(features, [r["boxes"] for r in results]))
        classes = torch.cat([r["classes"] for r in results])
        probs = logits[torch.arange(len(classes), device=logits.device), classes].sigmoid()
        for r, m in zip(results, probs.split([len(r["classes"]) for r in results]), strict=True):
            r["mask_probs"] = m
        return results

    def detect(self, boxes: torch.Tensor, probs: torch.Tensor, size: tuple[int, int]) -> dict:
        """detectron2's ``fast_rcnn_inference_single_image``: per class, boxes clipped to the
        image, scores above the threshold, class-wise NMS, the best ``detections_per_image``."""
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        index = torch.arange(len(boxes), device=boxes.device)
        if not valid.all():
            boxes, probs, index = boxes[valid], probs[valid], index[valid]
        probs = probs[:, :-1]  # background dropped
        boxes = clip_boxes(boxes.reshape(-1, 4), size).view(-1, self.num_classes, 4)
        keep_mask = probs > self.score_thresh  # (R, K)
        where = keep_mask.nonzero()  # (n, 2): proposal, class
        boxes, scores = boxes[keep_mask], probs[keep_mask]
        keep = batched_nms(boxes, scores, where[:, 1], self.nms_thresh)[: self.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "classes": where[keep, 1],
                "proposal_index": index[where[keep, 0]]}  # fmt: skip
