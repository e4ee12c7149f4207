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

from crossmae.evaluation import DatasetEvaluator, inference_on_dataset
from crossmae.progress import column_pairs, table

from .model import postprocess
from .roi_heads import TEST_SCORE_THRESH

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
NO_DETECTIONS = (f"no detection scored above {TEST_SCORE_THRESH} (the test threshold) on any "
                 "image: AP is undefined (null)")  # fmt: skip


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


def coco_evaluate(annotation_file: str | Path, results: list[dict], iou_types=("bbox", "segm"),
                  image_ids: list[int] | None = None) -> dict[str, dict]:  # fmt: skip
    """COCOeval over every image of the json (or only ``image_ids``), as detectron2's
    ``COCOEvaluator`` reports it:
    ``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...}}`` in percent (NaN where COCOeval
    has nothing to average, and all NaN without any result), ``per_class``: each category's AP
    by name and IoU type (precision over IoUs and recalls at area "all", 100 detections, NaN for
    a category without ground truth), ``summary``: COCOeval's own 12-line summary per IoU type,
    and ``detections``: how many results were scored."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    out: dict = {"per_class": {}, "summary": {}, "detections": len(results)}
    for iou_type in iou_types:
        res = copy.deepcopy(results)
        if iou_type == "segm":
            res = [r for r in res if "segmentation" in r]
            for r in res:
                r.pop("bbox", None)
        if not res:
            out[iou_type] = dict.fromkeys(METRICS, float("nan"))
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            ev = COCOeval(gt, gt.loadRes(res), iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {
            k: float(v * 100) if v >= 0 else float("nan")
            for k, v in zip(METRICS, ev.stats[:6], strict=True)
        }
        out["summary"][iou_type] = "\n".join(line for line in printed.getvalue().splitlines()
                                             if line.startswith(" Average"))  # fmt: skip
        out["per_class"][iou_type] = per_category_ap(ev, gt)
    return out


def per_category_ap(ev: COCOeval, gt: COCO) -> dict[str, float]:
    """detectron2's per-category AP: the mean of COCOeval's precisions over IoU thresholds and
    recall points at area "all" and 100 detections, ignoring the undefined (-1) entries."""
    precisions = ev.eval["precision"]  # (IoU, recall, category, area, max detections)
    names = [c["name"] for c in gt.loadCats(ev.params.catIds)]
    out = {}
    for k, name in enumerate(names):
        p = precisions[:, :, k, 0, -1]
        p = p[p > -1]
        out[name] = float(np.mean(p) * 100) if p.size else float("nan")
    return out


def report(metrics: dict) -> str:
    """The evaluation as detectron2 prints it: per IoU type COCOeval's summary, the six APs and
    the per-category AP table; without detections, why AP is undefined."""
    if not metrics.get("detections"):
        return NO_DETECTIONS
    parts = []
    for iou_type in ("bbox", "segm"):
        if iou_type not in metrics.get("summary", {}):
            continue
        parts += [f"Evaluation results for {iou_type}:", metrics["summary"][iou_type], "",
                  table(METRICS, [[metrics[iou_type][k] for k in METRICS]], ".3f"), "",
                  f"Per-category {iou_type} AP:",
                  column_pairs(metrics["per_class"][iou_type], ("category", "AP")), ""]  # fmt: skip
    return "\n".join(parts)


class COCOEvaluator(DatasetEvaluator):
    """COCO box and mask AP of a detector's outputs on ``dataset`` (``coco_evaluate``): each
    image's detections post-processed onto the original image and converted to COCO results
    with the json's category ids; COCOeval runs on the main process. ``results_file``: the
    results are also written there (detectron2's ``coco_instances_results.json``)."""

    desc = "COCO inference"
    main_only = True

    def __init__(self, dataset, results_file: str | Path | None = None):
        self.dataset, self.results_file = dataset, results_file

    def model_inputs(self, batch, device: torch.device) -> list[torch.Tensor]:
        return [im.to(device) for im in batch[0]]

    def process(self, inputs, outputs: list[dict]) -> None:
        imgs, infos = inputs
        low = (torch.float16, torch.bfloat16)  # autocast outputs, pasted in float32
        for im, p, info in zip(imgs, outputs, infos, strict=True):
            p = {k: v.float() if v.dtype in low else v for k, v in p.items()}
            p = postprocess(p, tuple(im.shape[-2:]), info["orig_size"])
            for r in instances_to_coco_json(p, info["image_id"]):
                r["category_id"] = self.dataset.cat_ids[r["category_id"]]
                self.results.append(r)

    def evaluate(self) -> dict:
        ds = self.dataset
        metrics = coco_evaluate(ds.annotation_file, self.results, image_ids=ds.image_ids)
        if self.results_file is not None:
            Path(self.results_file).write_text(json.dumps(self.results))
        return metrics


def evaluate_detector(
    model,
    dataset,
    *,
    batch_size: int = 1,
    precision: str = "fp32",
    results_file: str | Path | None = None,
) -> dict:
    """``COCOEvaluator``'s metrics of ``model`` over ``dataset`` (its evaluation view), at
    ``precision`` (fp32: detectron2's evaluation)."""
    from .data import collate_detection

    return inference_on_dataset(model, dataset, COCOEvaluator(dataset, results_file),
                                precision=precision, batch_size=batch_size,
                                collate_fn=collate_detection)  # fmt: skip
