"""Semantic-segmentation metrics from one confusion matrix (mmsegmentation / ADE20K benchmark
definitions): aAcc = correct labelled pixels / labelled pixels, IoU_c = |pred c ∩ label c| /
|pred c ∪ label c| over the whole dataset, Acc_c = |pred c ∩ label c| / |label c|; mIoU and mAcc
average the classes that occur (in labels or predictions). Pixels labelled ``ignore_index`` do
not count; a prediction outside 0..C-1 counts as wrong for its pixel and as no class.
"""

from __future__ import annotations

import math

import torch

from crossmae import distributed as du
from crossmae.progress import table


class SegMetrics:
    """Accumulates a (C, C + 1) confusion matrix: rows = labels, columns = predictions, the last
    column = predictions outside the classes.

    Args:
        num_classes: C.
        ignore_index: label value of unlabelled pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer maps of the same shape (any batch dims)."""
        if pred.shape != label.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape"
            )
        C = self.num_classes
        pred, label = pred.reshape(-1).long().cpu(), label.reshape(-1).long().cpu()
        keep = (label != self.ignore_index) & (label >= 0) & (label < C)
        pred, label = pred[keep], label[keep]
        pred = torch.where((pred >= 0) & (pred < C), pred, C)  # out of range -> the extra column
        self.cm += torch.bincount(label * (C + 1) + pred, minlength=C * (C + 1)).view(C, C + 1)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (each saw its own images)."""
        if du.is_dist():
            cm = self.cm.to(torch.device("cuda") if torch.cuda.is_available() and
                            torch.distributed.get_backend() == "nccl" else "cpu")  # fmt: skip
            torch.distributed.all_reduce(cm)
            self.cm = cm.cpu()

    def compute(self) -> dict:
        """{"aAcc", "mIoU", "mAcc"} in percent and per-class "IoU" / "Acc" lists (NaN where a
        class occurs in neither labels nor predictions)."""
        cm = self.cm.double()
        C = self.num_classes
        tp = cm.diagonal()
        label_area = cm.sum(dim=1)  # per class, including wrong and out-of-range predictions
        pred_area = cm[:, :C].sum(dim=0)
        union = label_area + pred_area - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
        acc = torch.where(label_area > 0, tp / label_area.clamp_min(1), torch.nan)
        total = cm.sum()
        return {
            "aAcc": 100 * (tp.sum() / total).item() if total > 0 else float("nan"),
            "mIoU": 100 * iou.nanmean().item(),
            "mAcc": 100 * acc.nanmean().item(),
            "IoU": (100 * iou).tolist(),
            "Acc": (100 * acc).tolist(),
        }


def pixel_accuracy(pred: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> float:
    """One image's pixel accuracy over its labelled pixels (the ADE20K benchmark's)."""
    keep = label != ignore_index
    return (pred[keep] == label[keep]).double().mean().item()


def per_class(result: dict, class_names: list[str]) -> dict[str, dict[str, float]]:
    """``compute``'s per-class lists keyed by class name: ``{name: {"IoU": .., "Acc": ..}}``."""
    return {
        name: {"IoU": iou, "Acc": acc}
        for name, iou, acc in zip(class_names, result["IoU"], result["Acc"], strict=True)
    }


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_table(metrics: dict) -> str:
    """mmseg's per-class results table (IoU / Acc per class), then the summary. A class in
    neither the labels nor the predictions (all of its cells ``-``: most of ADE20K's 150 on a
    few images) is left out, and the count of those said (results.json keeps every class)."""
    per_class = metrics["per_class"]
    rows = [[name, v["IoU"], v["Acc"]] for name, v in per_class.items()
            if not (_missing(v["IoU"]) and _missing(v["Acc"]))]  # fmt: skip
    absent = len(per_class) - len(rows)
    note = (f"({absent} of the {len(per_class)} classes are in neither the labels nor the "
            "predictions: not listed)\n") if absent else ""  # fmt: skip
    summary = table(["aAcc", "mIoU", "mAcc"], [[metrics[k] for k in ("aAcc", "mIoU", "mAcc")]])
    return f"per class results:\n{table(['Class', 'IoU', 'Acc'], rows)}\n{note}Summary:\n{summary}"
