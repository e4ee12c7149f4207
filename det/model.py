"""ViTDet Mask R-CNN (arXiv:2203.16527) assembled from torchvision's detection machinery (RPN,
RoI heads, Mask R-CNN) and our backbone, feature pyramid and ViTDet-style heads.

Settings follow ViTDet's detectron2 configs: anchors 32-512 (one size per level, ratios 0.5 / 1
/ 2), RPN with 2 convs, pre/post-NMS top-k 2000/1000 (train) and 1000/1000 (test), 512 RoIs per
image at 25 % positives, box regression weights (10, 10, 5, 5), box head of 4 convs + 1 fc with
LayerNorm, mask head of 4 convs with LayerNorm, aligned RoIAlign, pixel mean / std
(123.675, 116.28, 103.53) / (58.395, 57.12, 57.375).

Where torchvision's defaults differ from detectron2's, on purpose:
- box regression loss: torchvision's smooth-L1 with beta = 1/9 in the RPN and the RoI heads
  (detectron2's ViTDet uses plain L1, beta = 0); kept to stay on torchvision's tested losses.
- anchors: torchvision's generator rounds anchor corners to integers (detectron2 keeps them
  fractional); a sub-pixel difference, kept.
- RoIAlign: detectron2's aligned=True (half-pixel offset), not torchvision's default; see
  ``AlignedMultiScaleRoIAlign``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from .backbone import SimpleFeaturePyramid, ViTDetBackbone

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
DROP_PATH = {"base": 0.1, "large": 0.4, "huge": 0.5}


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign with ``aligned=True`` (pixel centres at +0.5, as
    detectron2's ROIAlignV2). A subclass, because MaskRCNN type-checks its poolers."""

    def forward(self, x, boxes, image_shapes):
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)  # (K, 5): batch index, x1, y1, x2, y2
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (f, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(f, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)  # fmt: skip
            out[idx] = pooled.to(out.dtype)
        return out


class PaddedInputTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: our data pipeline already resized and padded every image to the
    detection size (large-scale jitter for training, longest side + pad for evaluation)."""

    def resize(self, image, target=None):
        return image, target


def _layernorm2d(channels: int) -> nn.Module:
    from .backbone import LayerNorm2d

    return LayerNorm2d(channels)


def vitdet_mask_rcnn(
    backbone: ViTDetBackbone, num_classes: int, *, img_size: int = 1024
) -> MaskRCNN:
    """Mask R-CNN with ViTDet's settings on ``backbone``; ``num_classes`` excludes background."""
    fpn = SimpleFeaturePyramid(backbone, out_channels=256)
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)  # fmt: skip
    box_pool = AlignedMultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=0)
    mask_pool = AlignedMultiScaleRoIAlign(
        ["p2", "p3", "p4", "p5"], output_size=14, sampling_ratio=0
    )
    box_head = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=_layernorm2d)
    mask_head = MaskRCNNHeads(256, [256] * 4, 1, norm_layer=_layernorm2d)
    model = MaskRCNN(
        fpn,
        num_classes=num_classes + 1,  # + background
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(256, 3, conv_depth=2),
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000,
        rpn_post_nms_top_n_test=1000,
        box_roi_pool=box_pool,
        box_head=box_head,
        box_batch_size_per_image=512,
        box_positive_fraction=0.25,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
    )
    model.transform = PaddedInputTransform(
        img_size,
        img_size,
        [m / 255 for m in PIXEL_MEAN],
        [s / 255 for s in PIXEL_STD],
        size_divisible=backbone.patch_size,
    )
    return model
