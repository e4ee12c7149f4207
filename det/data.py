"""COCO-format instance data for ViTDet, as detectron2's ViTDet data pipeline prepares it
(``data/datasets/coco.py``, ``data/dataset_mapper.py``, ``data/detection_utils.py``,
``projects/ViTDet/configs/common/coco_loader_lsj.py``).

- Reading: PIL with the EXIF orientation applied, RGB, uint8.
- Categories: sorted COCO ids -> contiguous classes 0 ... K-1.
- Evaluation view: ``ResizeShortestEdge(S, max_size=S)`` with PIL bilinear on uint8 (every
  image kept; ground truth stays in the json for COCOeval).
- Training view (large-scale jitter): horizontal flip (p = 0.5), ``ResizeScale`` by a factor in
  [0.1, 2.0] of the scale that fits S x S (PIL bilinear, uint8), ``FixedSizeCrop(S, pad=False)``
  at one random offset fraction for both axes; instances are polygons, flipped, scaled and
  cropped with shapely, their boxes recomputed from the cropped polygons, empty ones dropped.
  Crowd annotations are not targets; polygons with fewer than 3 points are dropped, and images
  without a remaining annotation are skipped (detectron2's ``filter_empty_annotations``).

The network input is the uint8 image; normalising and padding happen in the model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from crossmae.data.datasets import read_or_skip

from .model import Targets
from .structures import Polygons, nonempty, polygon_boxes


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
    if not isinstance(seg, list) and not (isinstance(seg, dict) and "counts" in seg):
        raise AnnotationError(f"annotation {aid} (image {ann['image_id']}): bad segmentation")


def repeated(path: Path, key: str, ids: list) -> None:
    """Ids of a COCO list must be unique: pycocotools indexes by id and silently keeps one of
    each (an evaluation would score 1 of 13 objects that share an id)."""
    counts = Counter(ids)
    twice = sorted(((n, i) for i, n in counts.items() if n > 1), key=lambda x: -x[0])
    if twice:
        n, i = twice[0]
        more = f" ({len(twice) - 1} more ids repeated)" if len(twice) > 1 else ""
        raise AnnotationError(f"{path}: {key} id {i} appears {n} times{more}; COCO ids must be "
                              "unique (pycocotools would keep only one of them)")  # fmt: skip


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied (detectron2's ``read_image``)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def resize_u8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3), PIL's bilinear filter (detectron2's ``ResizeTransform``)."""
    h, w = size
    return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """The output size of detectron2's ``ResizeShortestEdge``: the short side to ``short``, the
    long side at most ``max_size``, rounded half up."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def crop_polygons(polygons: Polygons, x0: int, y0: int, w: int, h: int) -> Polygons:
    """One instance's polygons intersected with a crop box and moved into it (detectron2's
    ``CropTransform.apply_polygons``, shapely)."""
    import shapely.geometry as geometry

    box = geometry.box(x0, y0, x0 + w, y0 + h).buffer(0.0)
    out = []
    for p in polygons:
        poly = geometry.Polygon(p.reshape(-1, 2)).buffer(0.0)
        if not poly.is_valid:
            continue
        cropped = poly.intersection(box)
        if cropped.is_empty:
            continue
        parts = cropped.geoms if hasattr(cropped, "geoms") else [cropped]
        for part in parts:
            if not isinstance(part, geometry.Polygon) or not part.is_valid:
                continue
            coords = np.asarray(part.exterior.coords)[:-1] - np.array([x0, y0])
            out.append(coords.reshape(-1))
    return out


class CocoInstances(Dataset):
    """A COCO instances json + its image folder.

    Args:
        annotations: the json file.
        images: the image folder.
        train: large-scale jitter and training targets (else the evaluation view).
        img_size: detection input side S.
        scale_range: large-scale jitter factors.
        image_ids: only these images of the json (all when None); COCOeval then scores only them.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, train: bool,
                 img_size: int = 1024, scale_range: tuple[float, float] = (0.1, 2.0),
                 image_ids: list[int] | None = None):  # fmt: skip
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
        for key in ("images", "annotations", "categories"):  # pycocotools keeps one per id
            repeated(path, key, [item.get("id") for item in data[key]])
        self.images = {im["id"]: im for im in data["images"]}
        self.image_ids = None if image_ids is None else sorted(set(image_ids))
        if self.image_ids is not None:
            unknown = [i for i in self.image_ids if i not in self.images]
            if unknown:
                raise AnnotationError(f"{path}: no image with id {unknown[0]}"
                                      f"{f' (and {len(unknown) - 1} more)' if unknown[1:] else ''}"
                                      " among its images (data.image_ids)")  # fmt: skip
            self.images = {i: self.images[i] for i in self.image_ids}
        self.cat_ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
        self.class_names = [names[c] for c in self.cat_ids]  # by contiguous class
        self.class_of = {cid: i for i, cid in enumerate(self.cat_ids)}  # contiguous, 0-based
        self.anns: dict[int, list[dict]] = {i: [] for i in self.images}
        for ann in data["annotations"]:
            if self.image_ids is not None and ann.get("image_id") not in self.images:
                continue
            _check(ann, self.images)
            if ann["category_id"] not in self.class_of:
                raise AnnotationError(
                    f"annotation {ann['id']}: unknown category {ann['category_id']}"
                )
            self.anns[ann["image_id"]].append(ann)
        self.ids = sorted(self.images)
        for i in self.ids:  # every image it names, before anything trains
            name = self.images[i].get("file_name")
            if not isinstance(name, str):
                raise AnnotationError(f"{path}: image {i} has no file_name")
            if not (self.root / name).is_file():
                raise FileNotFoundError(f"{path}: image {i} names {self.root / name}, which "
                                        "does not exist")  # fmt: skip
        self.dropped = {"crowd": 0, "no polygon of 3 or more points": 0}
        if train:
            self.targets = {i: self._instances(i) for i in self.ids}
            self.ids = [i for i in self.ids if self.targets[i]]
            if not self.ids:
                why = ", ".join(f"{n} {k}" for k, n in self.dropped.items())
                raise AnnotationError(
                    f"{path}: no image has an instance to train on ({len(data['annotations'])} "
                    f"annotations, left out: {why}; training reads non-crowd instances with "
                    "polygon masks, as detectron2 does)"
                )
        self.train, self.img_size, self.scale_range = train, img_size, tuple(scale_range)
        self.annotation_file = path

    def _instances(self, image_id: int) -> list[tuple[int, Polygons]]:
        """The training instances of an image (class, polygons): crowd regions and polygons of
        fewer than 3 points dropped, as detectron2's COCO loader does."""
        out = []
        for ann in self.anns[image_id]:
            if ann["iscrowd"]:
                self.dropped["crowd"] += 1
                continue
            if not isinstance(ann["segmentation"], list):
                raise AnnotationError(
                    f"annotation {ann['id']} (image {image_id}): a non-crowd instance given as "
                    "RLE; training reads instance masks as polygons"
                )
            polys = [np.asarray(p, dtype=np.float64) for p in ann["segmentation"]
                     if len(p) % 2 == 0 and len(p) >= 6]  # fmt: skip
            if polys:
                out.append((self.class_of[ann["category_id"]], polys))
            else:
                self.dropped["no polygon of 3 or more points"] += 1
        return out

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict | Targets]:
        index, seed = key if isinstance(key, tuple) else (key, key)

        def path(j: int) -> Path:
            return self.root / self.images[self.ids[j]]["file_name"]

        # training skips an unreadable image for the next; evaluation must see every one
        index, img, _ = read_or_skip(lambda j: read_image(path(j)), lambda j: str(path(j)), index,
                                     len(self.ids), skip=self.train)  # fmt: skip
        info = self.images[self.ids[index]]
        H, W = img.shape[:2]
        S = self.img_size
        if not self.train:
            img = resize_u8(img, shortest_edge_size(H, W, S, S))
            image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
            return image, {"image_id": info["id"], "orig_size": (H, W)}
        rng = np.random.default_rng(seed)
        instances = [(c, [p.copy() for p in polys]) for c, polys in self.targets[info["id"]]]
        if rng.uniform() < 0.5:  # RandomFlip
            img = img[:, ::-1]
            for _, polys in instances:
                for p in polys:
                    p[0::2] = W - p[0::2]
        # ResizeScale: a random fraction of the S x S target, aspect kept
        r = rng.uniform(*self.scale_range)
        scale = min(S * r / H, S * r / W)
        h, w = (int(v) for v in np.round(np.multiply((H, W), scale)))
        img = resize_u8(np.ascontiguousarray(img), (h, w))
        for _, polys in instances:
            for p in polys:
                p[0::2] *= w * 1.0 / W
                p[1::2] *= h * 1.0 / H
        # FixedSizeCrop(S, pad=False): one offset fraction for both axes
        y0, x0 = (int(v) for v in np.round(np.maximum(np.subtract((h, w), S), 0) * rng.uniform()))
        img = img[y0 : y0 + S, x0 : x0 + S]
        cropped = [(c, crop_polygons(polys, x0, y0, S, S)) for c, polys in instances]
        cropped = [(c, polys) for c, polys in cropped if polys]
        boxes = polygon_boxes([polys for _, polys in cropped])
        keep = nonempty(boxes, 1e-5).tolist()
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        target = Targets(
            boxes=boxes[keep],
            classes=torch.tensor([c for (c, _), k in zip(cropped, keep, strict=True) if k],
                                 dtype=torch.int64),
            polygons=[polys for (_, polys), k in zip(cropped, keep, strict=True) if k],
        )  # fmt: skip
        return image, target


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


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list]:
    return [b[0] for b in batch], [b[1] for b in batch]
