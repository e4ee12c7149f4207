"""Pictures of what a segmenter predicts (``crossmae seg visualize``, mmseg's ``--show-dir``):
for each of the first N validation images, the image, its ground truth and the prediction as
colour overlays, with a legend of the classes shown. Colours are the dataset's own palette
(ADE20K's, CamVid's) unless two classes shown in one image would look alike in it (or the
dataset has none): then distinct colours, and the figure says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crossmae.visualize import distinct_colors, save_panels

from .data import IGNORE, SegFolder
from .evaluate import segment

CLOSE = 60  # RGB distance under which two classes' colours are taken for one on an overlay


def class_colors(palette: np.ndarray | None, num_classes: int,
                 shown: list[int]) -> tuple[np.ndarray, str]:  # fmt: skip
    """(num_classes, 3) uint8 colours for an image showing ``shown`` classes: the palette, or
    distinct colours for the shown classes where the palette has none or two of them close;
    and the note saying which."""
    if palette is not None:
        chosen = palette[shown].astype(np.float32)
        gaps = np.linalg.norm(chosen[:, None] - chosen[None], axis=-1)
        if len(shown) < 2 or gaps[np.triu_indices(len(shown), 1)].min() >= CLOSE:
            return palette, "dataset palette"
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    colors[shown] = distinct_colors(len(shown))
    if palette is None:
        return colors, "distinct colours"
    return colors, "distinct colours: the dataset palette has two of these classes alike"


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
        colors, which = class_colors(folder.spec.colors(), len(names), shown)
        correct = (pred == label)[label != IGNORE]
        acc = 100 * correct.mean() if correct.size else float("nan")
        written.append(save_panels(
            Path(out) / f"{stem}.png",
            [("image", img), ("ground truth", overlay(img, label, colors)),
             (f"prediction (pixel acc. {acc:.1f}%)", overlay(img, pred, colors))],
            title=f"{stem}  ({which})", legend=[(names[c], colors[c]) for c in shown],
        ))  # fmt: skip
    return written
