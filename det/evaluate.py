"""COCO box and mask AP as detectron2's ``COCOEvaluator`` computes it: detections post-processed
onto the original image (boxes scaled, masks pasted), converted by ``instances_to_coco_json``
(XYWH boxes, RLE masks), category ids mapped back to the json's, and pycocotools' COCOeval run
on every image of the json (the mask evaluation on results without their boxes, so that areas
come from the masks)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from crossmae import distributed as du

from .model import postprocess

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def instances_to_coco_json(result: dict[str, torch.Tensor], image_id: int) -> list[dict]:
    """One image's post-processed detections -> COCO result dicts (detectron2's
    ``instances_to_coco_json``); ``category_id`` is the contiguous class."""
    boxes = result["boxes"].cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH, in float32
    scores, classes = result["scores"].tolist(), result["classes"].tolist()
    rles = [None] * len(scores)
    if "masks" in result:
        rles = [mask_utils.encode(np.array(m[:, :, None], order="F", dtype=np.uint8))[0]
                for m in result["masks"].cpu().numpy()]  # fmt: skip
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")
    out = []
    for box, score, cls, rle in zip(boxes.tolist(), scores, classes, rles, strict=True):
        r = {"image_id": image_id, "category_id": cls, "bbox": box, "score": score}
        if rle is not None:
            r["segmentation"] = rle
        out.append(r)
    return out


def coco_evaluate(annotation_file: str | Path, results: list[dict],
                  iou_types=("bbox", "segm")) -> dict[str, dict[str, float]]:  # fmt: skip
    """COCOeval over every image of the json: {"bbox": {AP, AP50, ...}, "segm": {...}} in
    percent (NaN where COCOeval has nothing to average, and all NaN without any result)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    out = {}
    for iou_type in iou_types:
        res = copy.deepcopy(results)
        if iou_type == "segm":
            res = [r for r in res if "segmentation" in r]
            for r in res:
                r.pop("bbox", None)
        if not res:
            out[iou_type] = dict.fromkeys(METRICS, float("nan"))
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(res), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {
            k: float(v * 100) if v >= 0 else float("nan")
            for k, v in zip(METRICS, ev.stats[:6], strict=True)
        }
    return out


@torch.no_grad()
def evaluate_detector(
    model,
    dataset,
    device: torch.device,
    *,
    batch_size: int = 1,
    precision: torch.dtype | None = None,
    results_file: str | Path | None = None,
) -> dict:
    """Run ``model`` over ``dataset`` (evaluation view; each process takes its own shard, so every
    image counts once) and score it with COCOeval on the main process (all get the metrics).
    ``precision``: an autocast dtype, or None for full precision (detectron2's evaluation)."""
    from torch.utils.data import DataLoader, Subset

    from .data import collate_detection

    was_training = model.training
    model.eval()
    idx = du.shard(len(dataset), du.rank(), du.world_size())
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, collate_fn=collate_detection)
    results = []
    for imgs, infos in loader:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            preds = model([im.to(device) for im in imgs])
        for im, p, info in zip(imgs, preds, infos, strict=True):
            low = (torch.float16, torch.bfloat16)  # autocast outputs, pasted in float32
            p = {k: v.float() if v.dtype in low else v for k, v in p.items()}
            p = postprocess(p, tuple(im.shape[-2:]), info["orig_size"])
            for r in instances_to_coco_json(p, info["image_id"]):
                r["category_id"] = dataset.cat_ids[r["category_id"]]
                results.append(r)
    results = [r for part in du.all_gather_objects(results) for r in part]
    metrics = None
    if du.is_main():
        metrics = coco_evaluate(dataset.annotation_file, results)
        if results_file is not None:
            Path(results_file).write_text(json.dumps(results))
    model.train(was_training)
    return du.all_gather_objects(metrics)[0]
