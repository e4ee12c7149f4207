"""Pictures of what a detector predicts (``crossmae det visualize``): for each of the first N
images of a COCO json, the ground truth and the predictions above a score, drawn on the
original image (boxes, class names, scores, instance masks), as detectron2's ``Visualizer``
shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from crossmae.visualize import distinct_colors, save_panels

from .data import CocoInstances, read_image
from .model import postprocess


def draw_instances(img: np.ndarray, boxes: torch.Tensor, colors: list[tuple[int, int, int]],
                   labels: list[str], masks: torch.Tensor | None) -> np.ndarray:  # fmt: skip
    """Boolean masks (N, H, W), boxes (XYXY) and their labels drawn on an (H, W, 3) uint8 image,
    instance i in ``colors[i]``; labels on a filled tag above each box, in a font scaled to
    the image."""
    out = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # a writable copy
    if masks is not None and len(masks):
        out = draw_segmentation_masks(out, masks.bool(), alpha=0.45, colors=colors)
    width = max(1, round(max(img.shape[:2]) / 250))
    if len(boxes):
        out = draw_bounding_boxes(out, boxes.float(), colors=colors, width=width)
    canvas = Image.fromarray(out.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, max(img.shape[:2]) // 40))
    for (x0, y0, _, _), label, color in zip(boxes.tolist(), labels, colors, strict=True):
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        top, bottom = top - (bottom - top) - 2, y0  # above the box, inside the image
        if top < 0:
            top, bottom = y0, y0 + (bottom - top)
        draw.rectangle((left, top, right + 2, bottom), fill=color)
        draw.text((x0 + 1, top), label, fill="white", font=font)
    return np.asarray(canvas)


def class_colors(*classes: list[int]) -> dict[int, tuple[int, int, int]]:
    """One distinct colour per class present (ground truth and predictions of one image)."""
    present = sorted(set().union(*classes))
    return {c: tuple(int(v) for v in rgb) for c, rgb in
            zip(present, distinct_colors(len(present)), strict=True)}  # fmt: skip


def ground_truth(dataset: CocoInstances, image_id: int, h: int, w: int) -> tuple:
    """An image's annotations as boxes (XYXY), classes, labels and masks."""
    anns = dataset.anns[image_id]
    boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)])
    classes = [dataset.class_of[a["category_id"]] for a in anns]
    masks = []
    for a in anns:
        seg = a["segmentation"]
        rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else [seg]
        if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rles = [mask_utils.frPyObjects(seg, h, w)]
        masks.append(torch.from_numpy(mask_utils.decode(mask_utils.merge(rles)).astype(bool)))
    masks = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)
    return boxes.reshape(-1, 4), classes, [dataset.class_names[c] for c in classes], masks


def prediction_title(scores: torch.Tensor, kept: int, score: float) -> str:
    """The prediction panel's title: how many passed ``score``; for an empty panel, the highest
    score reached (a model that has not learned yet, or a threshold set too high)."""
    if kept or not len(scores):
        return f"prediction ({kept} with score >= {score:g})" if len(scores) else (
            "prediction (no detection at all)")  # fmt: skip
    return f"prediction (none with score >= {score:g}; highest score {float(scores.max()):.3f})"


@torch.no_grad()
def visualize_detections(model, dataset: CocoInstances, out: str | Path, *, images: int = 8,
                         score: float = 0.5) -> list[Path]:  # fmt: skip
    """``OUT/<image>.png`` for the first ``images`` images: ground truth | predictions scored
    at least ``score``. Returns the files written."""
    model.eval()
    device = next(model.parameters()).device
    written = []
    for index in range(min(images, len(dataset))):
        image, info = dataset[index]
        meta = dataset.images[info["image_id"]]
        orig = read_image(dataset.root / meta["file_name"])
        pred = model([image.to(device)])[0]
        pred = {k: v.float() if v.is_floating_point() else v for k, v in pred.items()}
        pred = postprocess(pred, tuple(image.shape[-2:]), info["orig_size"])
        keep = pred["scores"] >= score
        classes = pred["classes"][keep].tolist()
        labels = [f"{dataset.class_names[c]} {s:.2f}"
                  for c, s in zip(classes, pred["scores"][keep].tolist(), strict=True)]  # fmt: skip
        masks = pred["masks"][keep].cpu() if "masks" in pred else None
        gt_boxes, gt_classes, gt_labels, gt_masks = ground_truth(dataset, info["image_id"],
                                                                 *orig.shape[:2])  # fmt: skip
        color = class_colors(classes, gt_classes)
        drawn = draw_instances(orig, pred["boxes"][keep].cpu(), [color[c] for c in classes],
                               labels, masks)  # fmt: skip
        gt = draw_instances(orig, gt_boxes, [color[c] for c in gt_classes], gt_labels, gt_masks)
        name = Path(meta["file_name"]).stem
        written.append(save_panels(
            Path(out) / f"{name}.png",
            [(f"ground truth ({len(dataset.anns[info['image_id']])})", gt),
             (prediction_title(pred["scores"], len(classes), score), drawn)],
            title=f"{meta['file_name']} (image {info['image_id']})",
        ))  # fmt: skip
    return written
