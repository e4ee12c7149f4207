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
    class_names: tuple[str, ...] = ()  # for the per-class table ("class i" when empty)

    def names(self) -> list[str]:
        return list(self.class_names) or [f"class {i}" for i in range(self.num_classes)]

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
CAMVID = LabelSpec(
    num_classes=11,
    ignore_value=11,
    class_names=("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car",
                 "pedestrian", "bicyclist"),
)  # fmt: skip


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


class SegAugment(torch.utils.data.Dataset):
    """The mmsegmentation UperNet training pipeline on a ``SegFolder``, every draw from the
    sample's seed: random rescale (ratio in ``ratio_range`` of ``scale``, keeping the aspect),
    random ``crop`` x ``crop`` window in which no class covers more than ``cat_max_ratio`` of the
    labelled pixels (10 tries), horizontal flip, photometric distortion (brightness, contrast,
    saturation, hue, each with probability 0.5), padding to the crop (label ``IGNORE``),
    normalisation.

    Returns (image float (3, crop, crop), label int64 (crop, crop)).
    """

    def __init__(
        self,
        folder: SegFolder,
        crop: int = 512,
        scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        cat_max_ratio: float = 0.75,
    ):
        self.folder, self.crop, self.scale = folder, crop, tuple(scale)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision.transforms.functional as TF

        from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        index, seed = key
        g = torch.Generator().manual_seed(seed)

        def u(lo, hi):
            return lo + (hi - lo) * torch.rand((), generator=g).item()

        img, label, _ = self.folder[index]
        H, W = label.shape
        r = u(*self.ratio_range)
        f = min(max(self.scale) * r / max(H, W), min(self.scale) * r / min(H, W))
        h, w = max(1, round(H * f)), max(1, round(W * f))
        img = TF.resize(img, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label[None], [h, w], interpolation=TF.InterpolationMode.NEAREST)[0]
        c = self.crop
        for _ in range(10):  # a window not dominated by one class
            top = int(torch.randint(0, max(h - c, 0) + 1, (), generator=g))
            left = int(torch.randint(0, max(w - c, 0) + 1, (), generator=g))
            window = label[top : top + c, left : left + c]
            counts = torch.bincount(window[window != IGNORE].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        img, label = img[:, top : top + c, left : left + c], label[top : top + c, left : left + c]
        if u(0, 1) < 0.5:
            img, label = img.flip(-1), label.flip(-1)
        x = img.float()
        if u(0, 1) < 0.5:
            x = x + u(-32, 32)  # brightness
        x = x.clamp(0, 255) / 255
        if u(0, 1) < 0.5:
            x = TF.adjust_contrast(x, u(0.5, 1.5))
        if u(0, 1) < 0.5:
            x = TF.adjust_saturation(x, u(0.5, 1.5))
        if u(0, 1) < 0.5:
            x = TF.adjust_hue(x, u(-18, 18) / 360)
        x = TF.normalize(x.clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD)
        ph, pw = c - x.shape[1], c - x.shape[2]
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))
        label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=IGNORE)
        return x, label
