"""Pictures of what a segmenter predicts (``crossmae seg visualize``, mmseg's ``--show-dir``):
for each of the first N validation images, the image, its ground truth and the prediction as
colour overlays, with a legend of the classes shown. Colours are the dataset's own palette
(ADE20K's, CamVid's); a class whose colour would look like that of another class shown in the
same image gets a distinct one instead, and the figure says how many did."""

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
    """(num_classes, 3) uint8 colours for an image showing ``shown`` classes, and the note that
    says which: the dataset's palette, except that a shown class whose palette colour is close
    to one already given gets the first distinct colour that is close to none (without a
    palette, distinct colours throughout)."""
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    if palette is None:
        colors[shown] = distinct_colors(len(shown))
        return colors, "distinct colours"
    spare = [c.astype(np.float32) for c in distinct_colors(64)]
    given: list[np.ndarray] = []
    changed = []
    for c in shown:
        want = palette[c].astype(np.float32)
        if any(np.linalg.norm(want - g) < CLOSE for g in given):
            changed.append(c)
            want = next((d for d in spare if all(np.linalg.norm(d - g) >= CLOSE for g in given)),
                        spare[len(changed) % len(spare)])  # fmt: skip
        given.append(want)
        colors[c] = want
    return colors, "dataset palette" + (f"; {len(changed)} class(es) alike in it recoloured"
                                        if changed else "")  # fmt: skip


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
