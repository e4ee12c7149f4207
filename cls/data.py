"""Classification data: ImageFolder train / val pairs whose classes must agree, the evaluation
transform, and sharding that gives every validation image to exactly one process."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms as T
from torch.utils.data import Dataset

from crossmae.data import ImageFiles
from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def class_folders(train: str | Path, val: str | Path) -> tuple[ImageFiles, ImageFiles]:
    """Both splits, checked: ImageFolder layout, and the same class names in the same order (a
    mismatch would silently shift labels, so it is an error)."""
    tr, va = ImageFiles(train), ImageFiles(val)
    for split in (tr, va):
        if split.layout != "imagefolder":
            raise ValueError(f"{split.root}: expected class sub-folders (ImageFolder layout)")
    if tr.classes != va.classes:
        only_tr = sorted(set(tr.classes) - set(va.classes))
        only_va = sorted(set(va.classes) - set(tr.classes))
        raise ValueError(
            f"train and val classes differ: only in train {only_tr[:10]}, only in val "
            f"{only_va[:10]}" + ("" if only_tr or only_va else " (same names, different order)")
        )
    return tr, va


def eval_transform(img_size: int, crop_pct: float = 0.875) -> T.Compose:
    """Resize the shorter side to img_size / crop_pct (bicubic), centre crop, normalise."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


class Labelled(Dataset):
    """(image tensor, label, index) from an ``ImageFiles`` split through a torchvision transform."""

    def __init__(self, source: ImageFiles, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.source.load(i)), self.source.labels[i], i


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices ``rank, rank + world, ...``: every one of ``n`` items on exactly one process (no
    padding, unlike DistributedSampler, so evaluation counts each image once)."""
    return list(range(rank, n, world))
