"""COCO box and mask AP with pycocotools' COCOeval, from predictions made on the resized and
padded detection inputs (boxes and masks mapped back to the original image)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crossmae import distributed as du

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(prediction: dict, target: dict, category_of: list[int]) -> list[dict]:
    """One image's predictions (``boxes`` xyxy, ``scores``, ``labels``, optional ``masks``
    (N, 1, S, S) probabilities, all on the padded input) -> COCO result dicts in the original
    image's coordinates (boxes xywh, masks as RLE thresholded at 0.5)."""
    scale, (H, W), (h, w) = target["scale"], target["orig_size"], target["valid_size"]
    boxes = prediction["boxes"].float().cpu() / scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores, labels = prediction["scores"].tolist(), prediction["labels"].tolist()
    rles = [None] * len(scores)
    if "masks" in prediction and len(scores):
        m = prediction["masks"][:, :, :h, :w].float()  # drop the padding
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[:, 0] >= 0.5
        rles = mask_utils.encode(
            np.asfortranarray(m.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
        )
    out = []
    for box, score, label, rle in zip(xywh, scores, labels, rles, strict=True):
        r = {"image_id": target["image_id"], "category_id": category_of[label - 1], "bbox": box,
             "score": score}  # fmt: skip
        if rle is not None:
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
        out.append(r)
    return out


def coco_evaluate(annotation_file: str | Path, results: list[dict], image_ids: list[int],
                  iou_types=("bbox", "segm")) -> dict[str, dict[str, float]]:  # fmt: skip
    """COCOeval on ``image_ids``: {"bbox": {AP, AP50, ...}, "segm": {...}} in percent."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    out = {}
    for iou_type in iou_types:
        res = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not res:
            out[iou_type] = dict.fromkeys(METRICS, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(res)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {
            k: 100.0 * max(float(v), 0.0) for k, v in zip(METRICS, ev.stats[:6], strict=True)
        }
    return out


@torch.no_grad()
def evaluate_detector(
    model, dataset, device, *, batch_size: int = 2, results_file: str | Path | None = None
) -> dict:
    """Run ``model`` over ``dataset`` (evaluation view; each process takes its own shard, so every
    image counts once) and score it with COCOeval on the main process (all get the metrics)."""
    from torch.utils.data import DataLoader, Subset

    from .data import collate_detection

    model.eval()
    idx = du.shard(len(dataset), du.rank(), du.world_size())
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, collate_fn=collate_detection)
    results = []
    for imgs, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            preds = model([im.to(device) for im in imgs])
        for p, t in zip(preds, targets, strict=True):
            results += to_coco_results(p, t, dataset.cat_ids)
    results = [r for part in du.all_gather_objects(results) for r in part]
    metrics = None
    if du.is_main():
        metrics = coco_evaluate(
            dataset.annotation_file, results, [dataset.ids[i] for i in range(len(dataset))]
        )
        if results_file is not None:
            Path(results_file).write_text(json.dumps(results))
    model.train()
    return du.all_gather_objects(metrics)[0]
