"""Pictures of what a segmenter predicts (``crossmae seg visualize``, mmseg's ``--show-dir``):
for each of the first N validation images, the image, its ground truth and the prediction as
colour overlays, with a legend of the classes shown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crossmae.visualize import distinct_colors, save_panels

from .data import IGNORE, SegFolder
from .evaluate import segment


def overlay(
    img: np.ndarray, label: np.ndarray, colors: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Class colours (``colors[class]``, RGB) blended over an (H, W, 3) uint8 image; unlabelled
    (``IGNORE``) pixels left as they are."""
    colored = colors[np.where(label == IGNORE, 0, label)].astype(np.float32)
    out = img.astype(np.float32)
    keep = (label != IGNORE)[..., None]
    out = np.where(keep, (1 - alpha) * out + alpha * colored, out)
    return out.round().astype(np.uint8)


@torch.no_grad()
def visualize_segmentation(model, folder: SegFolder, out: str | Path, *, images: int = 4,
                           **settings) -> list[Path]:  # fmt: skip
    """``OUT/<image>.png`` for the first ``images`` images of ``folder``: image | ground truth |
    prediction (``settings``: ``segment``'s keyword arguments). Returns the files written."""
    model.eval()
    names = folder.spec.names()
    written = []
    for i in range(min(images, len(folder))):
        img, label, stem = folder[i]
        pred = segment(model, img, folder.spec.num_classes, **settings).argmax(1)[0].cpu()
        img, label, pred = img.permute(1, 2, 0).numpy(), label.numpy(), pred.numpy()
        shown = sorted((set(np.unique(label).tolist()) | set(np.unique(pred).tolist())) - {IGNORE})
        colors = np.zeros((len(names), 3), dtype=np.uint8)  # distinct for the classes shown
        colors[shown] = distinct_colors(len(shown))
        correct = (pred == label)[label != IGNORE]
        acc = 100 * correct.mean() if correct.size else float("nan")
        written.append(save_panels(
            Path(out) / f"{stem}.png",
            [("image", img), ("ground truth", overlay(img, label, colors)),
             (f"prediction (pixel acc. {acc:.1f}%)", overlay(img, pred, colors))],
            title=stem, legend=[(names[c], colors[c]) for c in shown],
        ))  # fmt: skip
    return written
