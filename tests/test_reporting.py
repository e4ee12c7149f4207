"""What evaluations show: progress with rate and ETA, detectron2's COCOeval summary and
per-category AP, mmseg's per-class table, per-class accuracy, the reason for an undefined AP,
and the reconstruction colours of a grey photo."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae.progress import Progress, column_pairs, duration, rate, table


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_progress_logs_count_rate_and_eta_without_a_terminal():
    logger, handler = logging.getLogger("crossmae"), Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with Progress(10, "COCO inference", every_s=0.0) as bar:
            for _ in range(4):
                bar.update()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = handler.lines
    assert lines[0] == "COCO inference: 10 img"
    assert lines[1].startswith("COCO inference: 1/10 img, ") and "ETA " in lines[1]
    assert lines[4].startswith("COCO inference: 4/10 img, ")
    assert lines[-1].startswith("COCO inference: 4 img in ")
    assert duration(3725) == "1h02m" and duration(272) == "4m32s" and duration(12) == "12s"
    assert rate(10, 4.0, "img") == "2.5 img/s" and rate(1, 4.0, "img") == "4 s/img"


def test_tables_align_and_show_missing_values_as_a_dash():
    out = table(["class", "IoU"], [["road", 91.234], ["sky", None], ["car", float("nan")]])
    lines = out.splitlines()
    assert lines[0] == "| class | IoU   |" and lines[2] == "| road  | 91.23 |"
    assert lines[3] == "| sky   | -     |" and lines[4] == "| car   | -     |"
    assert len({len(line) for line in lines}) == 1
    pairs = column_pairs({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, ("category", "AP"))
    rows = pairs.splitlines()
    assert rows[0].split("|")[1:-1] == [" category ", " AP    "] * 3
    assert [c.strip() for c in rows[3].split("|")[1:-1]] == ["d", "4.000", "", "", "", ""]


def test_coco_evaluation_reports_summary_and_per_category_ap(shared_dir):
    from pycocotools.coco import COCO

    from det.evaluate import NO_DETECTIONS, coco_evaluate, report
    from det.task import DetTask

    ann = shared_dir / "data" / "coco128" / "annotations" / "instances_train2017.json"
    gt = COCO(str(ann))
    person = gt.getCatIds(catNms=["person"])[0]
    # every person box detected exactly, nothing else: person AP 100, the others 0 or undefined
    results = [{"image_id": a["image_id"], "category_id": person, "bbox": a["bbox"], "score": 1.0}
               for a in gt.loadAnns(gt.getAnnIds(catIds=[person]))]  # fmt: skip
    metrics = coco_evaluate(ann, results, iou_types=("bbox",))
    per = metrics["per_class"]["bbox"]
    assert per["person"] == pytest.approx(100.0)
    other = [v for k, v in per.items() if k != "person" and not math.isnan(v)]
    assert other and all(v == 0.0 for v in other)
    assert len(per) == len(gt.getCatIds()) and metrics["detections"] == len(results)
    text = report(metrics)
    assert "Evaluation results for bbox:" in text and "Per-category bbox AP:" in text
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in text
    assert re.search(r"\| person +\| 100\.000 +\|", text)
    assert f"| {metrics['bbox']['AP']:.3f} |" in text
    # nothing detected: AP null, and why
    none = coco_evaluate(ann, [])
    assert report(none) == NO_DETECTIONS and "0.05" in NO_DETECTIONS
    head = DetTask.transfer.numbers({"metrics": none})
    assert head == {"ap_box": None, "ap_mask": None, "note": NO_DETECTIONS}


def test_segmentation_table_names_every_class_present():
    from seg.metrics import SegMetrics, format_table, per_class

    m = SegMetrics(3)
    m.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
    result = m.compute()
    metrics = {**{k: result[k] for k in ("aAcc", "mIoU", "mAcc")},
               "per_class": per_class(result, ["road", "sky", "car"])}  # fmt: skip
    assert metrics["per_class"]["road"] == {"IoU": 50.0, "Acc": 50.0}
    assert math.isnan(metrics["per_class"]["car"]["IoU"])
    text = format_table(metrics)
    assert re.search(r"\| road +\| 50\.00 +\| 50\.00 +\|", text)
    assert re.search(r"\| sky +\| 50\.00 +\| 100\.00 +\|", text)
    assert "car" not in text  # in neither labels nor predictions: counted, not listed
    assert "(1 of the 3 classes are in neither the labels nor the predictions" in text
    m.update(torch.tensor([[2]]), torch.tensor([[0]]))  # a car predicted where there is none
    metrics["per_class"] = per_class(m.compute(), ["road", "sky", "car"])
    text = format_table(metrics)
    assert re.search(r"\| car +\| 0\.00 +\| - +\|", text) and "not listed" not in text
    assert "| 66.67 | 50.00 | 75.00 |" in text  # aAcc, mIoU, mAcc


def test_classifier_evaluation_counts_each_class(tmp_path):
    from cls.finetune import evaluate_classifier, format_classes
    from crossmae.data import ImageFiles

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (200, 50, 50)).save(tmp_path / c / f"{i}.png")
    src = ImageFiles(tmp_path)

    class Cat(torch.nn.Module):  # says "cat" to everything
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2)

    acc = evaluate_classifier(Cat(), src, 8, workers=0, precision="fp32")
    assert acc["per_class"] == {"cat": {"top1": 100.0, "images": 3},
                                "dog": {"top1": 0.0, "images": 3}}  # fmt: skip
    assert acc["top1"] == 50.0 and acc["top5"] is None
    text = format_classes({"top-1": acc["per_class"]})
    assert "| cat   | 100.00 | 3      |" in text and "| dog   | 0.00   | 3      |" in text
    many = {f"c{i:02d}": {"top1": float(i), "images": 1} for i in range(30)}
    text = format_classes({"top-1": many})
    assert "5 worst and 5 best of 30" in text and "c00" in text and "c29" in text
    assert "c15" not in text


def test_reconstruction_of_a_grey_photo_stays_grey_when_the_prediction_is_right():
    """Colour casts on grey photos come from the model's error, not from de-normalising: a
    perfect norm-pix prediction gives back the grey image exactly."""
    from skimage import data

    import crossmae
    from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from crossmae.models.masking import normalize_patches, patchify
    from crossmae.reconstruction import reconstruct

    model = crossmae.create_model("crossmae_vit_tiny_patch8", img_size=32)
    grey = torch.from_numpy(data.camera()[::16, ::16].astype(np.float32) / 255).expand(3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = ((grey - mean) / std)[None]
    forward = model.forward

    def perfect(imgs, **kw):
        out = forward(imgs, **kw)
        out["pred"] = normalize_patches(patchify(imgs.float(), model.patch_size))[0]
        return out

    model.forward = perfect
    rec = reconstruct(model, x, torch.randperm(16)[None])
    assert (rec["pasted"] - rec["original"]).abs().max() < 1e-5
    assert (rec["pasted"].amax(dim=1) - rec["pasted"].amin(dim=1)).max() < 1e-5  # still grey


def test_results_json_holds_no_nan(tmp_path):
    from crossmae.checkpoint import strict_json

    text = strict_json({"AP": float("nan"), "per_class": {"a": float("inf")}})
    assert json.loads(text) == {"AP": None, "per_class": {"a": None}}


def test_ade20k_classes_carry_their_names(shared_dir):
    """mmseg's per-class table names: the first name of each objectInfo150.txt entry (mmseg
    keeps "television receiver" whole)."""
    from seg.data import ADE20K

    info = (shared_dir / "data" / "ade20k_samples" / "objectInfo150.txt").read_text()
    first = [line.split("\t")[-1].split(",")[0].strip() for line in info.splitlines()[1:]]
    assert len(ADE20K.names()) == 150
    differ = [(a, b) for a, b in zip(ADE20K.names(), first, strict=True) if a != b]
    assert differ == [("television receiver", "television")]


def test_the_evaluations_of_a_run_as_a_table_and_a_curve(tmp_path):
    from crossmae.visualize import save_evaluation_curve

    rows = [{"step": 10, "epoch": 1.0, "lr": 0.1, "loss": 2.0},
            {"step": 10, "epoch": 1.0, "bbox/AP": 12.5, "segm/AP": None},
            {"step": 20, "epoch": 2.0, "lr": 0.1, "loss": 1.0},
            {"step": 20, "epoch": 2.0, "bbox/AP": 30.25, "segm/AP": 20.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, png = save_evaluation_curve(tmp_path / "metrics.jsonl", tmp_path,
                                    {"bbox/AP": "box AP", "segm/AP": "mask AP"})  # fmt: skip
    assert md.read_text().splitlines() == [
        "| step | epoch | box AP | mask AP | train loss |", "|---|---|---|---|---|",
        "| 10 | 1 | 12.50 | n/a | 2.0000 |", "| 20 | 2 | 30.25 | 20.00 | 1.0000 |"]  # fmt: skip
    assert png is not None and Image.open(png).size[0] > 400
    # before any metric has a value: the table, no picture
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1] | {"bbox/AP": None}) + "\n")
    assert save_evaluation_curve(tmp_path / "metrics.jsonl", tmp_path, {"bbox/AP": "AP"})[1] is None
