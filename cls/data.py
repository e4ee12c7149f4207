"""Classification data: ImageFolder train / val pairs whose classes must agree."""

from __future__ import annotations

from pathlib import Path

from crossmae.data import ImageFiles


def class_folders(
    train: str | Path, val: str | Path, per_class: int | None = None
) -> tuple[ImageFiles, ImageFiles]:
    """Both splits, checked: ImageFolder layout, and the same class names in the same order (a
    mismatch would silently shift labels, so it is an error). ``per_class``: only the first N
    images of each class of each split."""
    tr, va = ImageFiles(train), ImageFiles(val)
    if per_class is not None:
        tr.keep_first_per_class(per_class)
        va.keep_first_per_class(per_class)
    for split in (tr, va):
        if split.layout != "imagefolder":
            raise ValueError(f"{split.root}: expected class sub-folders (ImageFolder layout)")
        if len(split.classes) < 2:
            raise ValueError(f"{split.root} has {len(split.classes)} class folder(s): a "
                             "classifier needs at least 2")  # fmt: skip
    if tr.classes != va.classes:
        only_tr = sorted(set(tr.classes) - set(va.classes))
        only_va = sorted(set(va.classes) - set(tr.classes))
        raise ValueError(
            f"train and val classes differ: only in train {only_tr[:10]}, only in val "
            f"{only_va[:10]}" + ("" if only_tr or only_va else " (same names, different order)")
        )
    return tr, va
