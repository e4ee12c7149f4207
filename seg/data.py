"""Segmentation data: the ADEChallengeData2016 layout (150 classes; label 0 = "other" is ignored
and the rest shift down by one, "reduce zero label") and a generic images + label-PNG layout
with a configurable class count and ignore value (CamVid: 11 classes, 11 = void)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossmae.data import load_rgb

IGNORE = 255
IMG_EXTS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class LabelSpec:
    """How a dataset's label PNGs map to training labels 0..num_classes-1 and ``IGNORE``."""

    num_classes: int
    ignore_value: int | None = None  # a raw label value meaning "unlabelled"
    reduce_zero_label: bool = False  # ADE20K: raw 0 -> ignore, raw k -> k - 1

    def convert(self, raw: np.ndarray) -> torch.Tensor:
        lab = torch.from_numpy(raw.astype(np.int64))
        if self.reduce_zero_label:
            lab = torch.where(lab == 0, IGNORE + 1, lab) - 1  # 0 -> 255, k -> k - 1
        if self.ignore_value is not None:
            lab = torch.where(
                torch.from_numpy(raw.astype(np.int64)) == self.ignore_value, IGNORE, lab
            )
        return torch.where((lab >= 0) & (lab < self.num_classes), lab, IGNORE)


ADE20K = LabelSpec(num_classes=150, reduce_zero_label=True)
CAMVID = LabelSpec(num_classes=11, ignore_value=11)


class SegFolder(torch.utils.data.Dataset):
    """Pairs ``images/<split>/<name>.<jpg|png>`` with ``annotations/<split>/<name>.png`` (the
    ADEChallengeData2016 and CamVid layouts). A missing label file is an error naming it.

    Returns (image uint8 (3, H, W), label int64 (H, W) in 0..C-1 or ``IGNORE``, name).
    """

    def __init__(self, root: str | Path, split: str, spec: LabelSpec):
        self.root, self.spec = Path(root), spec
        img_dir, ann_dir = self.root / "images" / split, self.root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"{d} does not exist (expected images/ and annotations/ per split)"
                )
        self.items = []
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() in IMG_EXTS:
                lab = ann_dir / (p.stem + ".png")
                if not lab.is_file():
                    raise FileNotFoundError(f"no label {lab} for image {p}")
                self.items.append((p, lab))
        if not self.items:
            raise FileNotFoundError(f"no images in {img_dir}")

    def __len__(self) -> int:
        return len(self.items)

    def raw_label(self, i: int) -> np.ndarray:
        return np.array(Image.open(self.items[i][1]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        img_path, _ = self.items[i]
        img = torch.from_numpy(np.array(load_rgb(img_path))).permute(2, 0, 1)
        return img, self.spec.convert(self.raw_label(i)), img_path.stem
