"""Box, matching, sampling and mask utilities with detectron2's semantics (``structures/boxes.py``,
``modeling/box_regression.py``, ``modeling/matcher.py``, ``modeling/sampling.py``,
``structures/masks.py``, ``layers/mask_ops.py``).

Boxes are (N, 4) XYXY tensors. As in detectron2, box geometry (anchors, proposals, detections,
ground truth, IoU matching, delta decoding) runs in float32 whatever the model's precision: the
numbers then agree with detectron2's to the last bit where the ops agree.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms as tv_batched_nms


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) -> (N, M) IoU; 0 where the boxes do not overlap."""
    area_a, area_b = box_area(a), box_area(b)
    wh = torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])  # (N, M, 2)
    inter = wh.clamp_(min=0).prod(dim=2)
    return torch.where(inter > 0, inter / (area_a[:, None] + area_b - inter), inter.new_zeros(1))


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clamp XYXY boxes to an image of ``size = (h, w)``."""
    h, w = size
    x1, y1 = boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h)
    x2, y2 = boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Boxes wider and taller than ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float):
    """torchvision's class-wise NMS on float32-valued boxes (detectron2 passes ``boxes.float()``);
    boxes and scores handed to the kernel in one dtype, at least float32 (fp16 logits under
    autocast do not round the boxes). Kept indices in decreasing score order."""
    dtype = torch.promote_types(torch.float32, scores.dtype)
    return tv_batched_nms(boxes.float().to(dtype), scores.to(dtype), groups, iou)


class BoxCoder:
    """detectron2's ``Box2BoxTransform``: deltas (dx, dy, dw, dh) between boxes, scaled by
    ``weights``; dw and dh clamped at log(1000 / 16) when decoding. Both directions in float32.

    Args:
        weights: (wx, wy, ww, wh), (1, 1, 1, 1) in the RPN and (10, 10, 5, 5) in the box head.
    """

    def __init__(self, weights: tuple[float, float, float, float]):
        self.weights = weights
        self.scale_clamp = math.log(1000.0 / 16)

    def get_deltas(self, src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, 4) source and target boxes -> (N, 4) deltas turning source into target."""
        sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
        sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
        tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
        tx, ty = target[:, 0] + 0.5 * tw, target[:, 1] + 0.5 * th
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (tx - sx) / sw, wy * (ty - sy) / sh,
                            ww * torch.log(tw / sw), wh * torch.log(th / sh)), dim=1)  # fmt: skip

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4k) deltas applied to (N, 4) boxes -> (N, 4k) boxes, float32."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        px, py = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
        pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
        out = torch.stack((px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph), dim=-1)
        return out.reshape(deltas.shape)


class Matcher:
    """detectron2's ``Matcher``: each prediction (column) gets the ground truth (row) of highest
    IoU and a label by IoU band; with ``allow_low_quality_matches`` every ground truth's best
    predictions (ties included) are labelled positive as well.

    Args:
        thresholds: band edges, e.g. [0.3, 0.7].
        labels: one label per band, e.g. [0, -1, 1] (negative, ignored, positive).
        allow_low_quality_matches: see above (the RPN: yes; the box head: no).
    """

    def __init__(self, thresholds: list[float], labels: list[int], *,
                 allow_low_quality_matches: bool):  # fmt: skip
        if len(labels) != len(thresholds) + 1:
            raise ValueError("a Matcher needs one more label than thresholds")
        self.thresholds = [-float("inf"), *thresholds, float("inf")]
        self.labels = labels
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, P) match quality -> matched ground-truth index (P,) and label (P,) int8."""
        if quality.numel() == 0:
            n = quality.shape[1]
            matches = quality.new_zeros(n, dtype=torch.int64)
            return matches, quality.new_full((n,), self.labels[0], dtype=torch.int8)
        vals, matches = quality.max(dim=0)
        labels = matches.new_full(matches.shape, 1, dtype=torch.int8)
        for lab, lo, hi in zip(self.labels, self.thresholds[:-1], self.thresholds[1:], strict=True):
            labels[(vals >= lo) & (vals < hi)] = lab
        if self.allow_low_quality_matches:
            best = quality.max(dim=1).values  # (G,)
            _, cols = torch.nonzero(quality == best[:, None], as_tuple=True)
            labels[cols] = 1
        return matches, labels


def subsample_labels(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's ``subsample_labels``: up to ``num_samples * positive_fraction`` random
    positives (label not -1 and not ``bg_label``), the rest random negatives; returns their
    indices (positives, negatives), drawn with ``torch.randperm`` in that order."""
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm1 = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm2 = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm1], negative[perm2]


# ----------------------------------------------------------------------------- masks
Polygons = list[np.ndarray]  # one instance: its polygons, each (2k,) float64 [x0, y0, x1, ...]


def polygons_to_bitmask(polygons: Polygons, height: int, width: int) -> np.ndarray:
    """Rasterise one instance's polygons with pycocotools -> (height, width) bool."""
    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in polygons], height, width))
    return mask_utils.decode(rle).astype(bool)


def rasterize_polygons_within_box(polygons: Polygons, box: np.ndarray, size: int) -> np.ndarray:
    """The mask-head target of one instance, a ``size x size`` bool array: its polygons moved
    into ``box`` (float32 XYXY), scaled and rasterised (detectron2's
    ``rasterize_polygons_within_box``, with its numpy dtypes: float64 polygons, float32 box and
    ratios). The caller stacks an image's targets into one tensor."""
    w, h = box[2] - box[0], box[3] - box[1]
    polygons = copy.deepcopy(polygons)
    for p in polygons:
        p[0::2] = p[0::2] - box[0]
        p[1::2] = p[1::2] - box[1]
    ratio_h, ratio_w = size / max(h, 0.1), size / max(w, 0.1)
    for p in polygons:
        if ratio_h == ratio_w:
            p *= ratio_h
        else:
            p[0::2] *= ratio_w
            p[1::2] *= ratio_h
    return polygons_to_bitmask(polygons, size, size)


def polygon_boxes(instances: list[Polygons]) -> torch.Tensor:
    """Tight float32 XYXY boxes of instances given as polygons (detectron2's
    ``PolygonMasks.get_bounding_boxes``)."""
    out = torch.zeros(len(instances), 4, dtype=torch.float32)
    for i, polys in enumerate(instances):
        xy = torch.from_numpy(np.concatenate(polys).reshape(-1, 2)).to(torch.float32)
        out[i, :2], out[i, 2:] = xy.min(dim=0).values, xy.max(dim=0).values
    return out


def paste_masks_in_image(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    size: tuple[int, int],
    threshold: float | None = 0.5,
) -> torch.Tensor:
    """Paste (N, M, M) mask probabilities into their float32 boxes on an image of ``size``,
    bilinearly (``grid_sample``, pixel centres at +0.5) and thresholded -> (N, h, w) bool, or
    the probabilities themselves with ``threshold=None`` (detectron2's ``paste_masks_in_image``;
    on the CPU it pastes each mask within the box's bounding pixels, elsewhere all at once,
    which gives the same pixels)."""
    N = len(masks)
    img_h, img_w = size
    dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros(N, img_h, img_w, dtype=dtype, device=masks.device)
    if N == 0:
        return out
    per_mask = masks.device.type == "cpu"
    for inds in torch.arange(N).chunk(N if per_mask else 1):
        b = boxes[inds]
        if per_mask:  # only the pixels the boxes can reach
            x0, y0 = torch.clamp(b.min(dim=0).values.floor()[:2] - 1, min=0).to(torch.int32)
            x1 = torch.clamp(b[:, 2].max().ceil() + 1, max=img_w).to(torch.int32)
            y1 = torch.clamp(b[:, 3].max().ceil() + 1, max=img_h).to(torch.int32)
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        else:
            x0, y0, x1, y1 = 0, 0, img_w, img_h
        bx0, by0, bx1, by1 = torch.split(b, 1, dim=1)  # each (n, 1)
        ys = torch.arange(y0, y1, device=b.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0, x1, device=b.device, dtype=torch.float32) + 0.5
        ys = (ys - by0) / (by1 - by0) * 2 - 1  # (n, h') in [-1, 1] across the box
        xs = (xs - bx0) / (bx1 - bx0) * 2 - 1  # (n, w')
        n = len(inds)
        grid = torch.stack([xs[:, None, :].expand(n, ys.shape[1], xs.shape[1]),
                            ys[:, :, None].expand(n, ys.shape[1], xs.shape[1])], dim=3)  # fmt: skip
        m = masks[inds, None]
        m = m if m.dtype.is_floating_point else m.float()
        pasted = F.grid_sample(m, grid.to(m.dtype), align_corners=False)[:, 0]  # (n, h', w')
        out[inds, y0:y1, x0:x1] = pasted >= threshold if threshold is not None else pasted
    return out
