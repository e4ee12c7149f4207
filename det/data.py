"""COCO-format instance data for ViTDet: polygon and RLE masks, crowd regions as COCO treats
them, large-scale jitter for training and resize-longest-side + pad for evaluation.

Training follows detectron2's ViTDet recipe: horizontal flip, resize by a random factor in
[0.1, 2.0] of the scale that fits the image in S x S, a random S x S crop (padding smaller
images), boxes recomputed from the cropped masks; crowd annotations and instances left empty
by the crop are dropped, and images without any non-crowd annotation are skipped (detectron2's
``filter_empty_annotations``). Evaluation keeps every image and the annotated boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from crossmae.data import load_rgb


class AnnotationError(ValueError):
    """A malformed COCO annotation file; the message names the image or annotation id."""


def _check(ann: dict, images: dict[int, dict]) -> None:
    aid = ann.get("id", "?")
    for key in ("id", "image_id", "category_id", "bbox", "segmentation", "iscrowd"):
        if key not in ann:
            raise AnnotationError(f"annotation {aid}: missing {key!r}")
    if ann["image_id"] not in images:
        raise AnnotationError(f"annotation {aid}: image_id {ann['image_id']} is not in 'images'")
    if len(ann["bbox"]) != 4 or ann["bbox"][2] < 0 or ann["bbox"][3] < 0:
        raise AnnotationError(f"annotation {aid} (image {ann['image_id']}): bad bbox {ann['bbox']}")
    seg = ann["segmentation"]
    if isinstance(seg, list):
        if any(len(p) < 6 or len(p) % 2 for p in seg):
            raise AnnotationError(f"annotation {aid} (image {ann['image_id']}): bad polygon")
    elif not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        raise AnnotationError(f"annotation {aid} (image {ann['image_id']}): bad segmentation")


def ann_to_mask(seg, height: int, width: int) -> np.ndarray:
    """A polygon list or an (un)compressed RLE -> (H, W) uint8 mask."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


class CocoInstances(Dataset):
    """A COCO instances json + its image folder.

    Args:
        annotations: the json file.
        images: the image folder.
        train: large-scale jitter and empty-image filtering (else the evaluation view).
        img_size: detection input side S.
        scale_range: large-scale jitter factors.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, train: bool,
                 img_size: int = 1024, scale_range: tuple[float, float] = (0.1, 2.0)):  # fmt: skip
        self.root = Path(images)
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path} is not valid json: {e}") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise AnnotationError(f"{path}: no {key!r} list")
        self.images = {im["id"]: im for im in data["images"]}
        self.cat_ids = sorted(c["id"] for c in data["categories"])
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}  # 0 = background
        self.category_names = {c["id"]: c["name"] for c in data["categories"]}
        self.anns: dict[int, list[dict]] = {i: [] for i in self.images}
        for ann in data["annotations"]:
            _check(ann, self.images)
            if ann["category_id"] not in self.label_of:
                raise AnnotationError(
                    f"annotation {ann['id']}: unknown category {ann['category_id']}"
                )
            self.anns[ann["image_id"]].append(ann)
        self.ids = sorted(self.images)
        if train:
            self.ids = [i for i in self.ids if any(not a["iscrowd"] for a in self.anns[i])]
        self.train, self.img_size, self.scale_range = train, img_size, tuple(scale_range)
        self.annotation_file = path

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        g = torch.Generator().manual_seed(seed)
        info = self.images[self.ids[index]]
        img = torch.from_numpy(np.array(load_rgb(self.root / info["file_name"]))).permute(2, 0, 1)
        H, W = img.shape[1:]
        # crowd regions are COCOeval's business (ignored there), not targets
        anns = [a for a in self.anns[info["id"]] if not a["iscrowd"]]
        masks = torch.from_numpy(np.stack([ann_to_mask(a["segmentation"], H, W) for a in anns])
                                 if anns else np.zeros((0, H, W), np.uint8))  # fmt: skip
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        S = self.img_size
        if self.train:  # large-scale jitter
            if torch.rand((), generator=g).item() < 0.5:
                img, masks = img.flip(-1), masks.flip(-1)
            lo, hi = self.scale_range
            scale = (lo + (hi - lo) * torch.rand((), generator=g).item()) * min(S / H, S / W)
        else:
            scale = S / max(H, W)
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        img = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        if len(masks):
            masks = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0].to(
                torch.uint8
            )
        else:  # an image with only crowd regions (evaluation view)
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        top = left = 0
        if self.train:  # random S x S crop of what is larger than S
            top = int(torch.randint(0, max(h - S, 0) + 1, (), generator=g))
            left = int(torch.randint(0, max(w - S, 0) + 1, (), generator=g))
            img, masks = (
                img[:, top : top + S, left : left + S],
                masks[:, top : top + S, left : left + S],
            )
            boxes = masks_to_boxes(masks)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, masks, labels = boxes[keep], masks[keep], labels[keep]
        else:
            boxes = boxes * scale
        ph, pw = S - img.shape[1], S - img.shape[2]
        img = F.pad(img, (0, pw, 0, ph)) / 255.0  # (3, S, S) in [0, 1]
        masks = F.pad(masks, (0, pw, 0, ph))
        target = {
            "boxes": boxes, "labels": labels, "masks": masks, "image_id": info["id"],
            "orig_size": (H, W), "scale": scale, "valid_size": (min(h, S), min(w, S)),
        }  # fmt: skip
        return img, target


def coco_subset(src: str | Path, dest: str | Path, n: int) -> Path:
    """Write the first ``n`` images of a COCO instances json, with their annotations, to
    ``dest`` (small runs and smoke tests)."""
    data = json.loads(Path(src).read_text())
    data["images"] = data["images"][:n]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dest = Path(dest)
    dest.write_text(json.dumps(data))
    return dest


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) tight xyxy boxes (pixel edges); an empty mask gives zeros."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4))
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    out = torch.zeros((masks.shape[0], 4))
    for i in range(masks.shape[0]):
        r, c = torch.where(rows[i])[0], torch.where(cols[i])[0]
        if len(r):
            out[i] = torch.tensor([c[0], r[0], c[-1] + 1, r[-1] + 1], dtype=torch.float32)
    return out


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]
