"""Segmentation data: the ADEChallengeData2016 layout (150 classes; label 0 = "other" is ignored
and the rest shift down by one, "reduce zero label") and a generic images + label-PNG layout
with a configurable class count and ignore value (CamVid: 11 classes, 11 = void)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossmae.config import ConfigError
from crossmae.data import load_rgb
from crossmae.data.datasets import LabelError, read_or_skip

IGNORE = 255
IMG_EXTS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class LabelSpec:
    """How a dataset's label PNGs map to training labels 0..num_classes-1 and ``IGNORE``."""

    num_classes: int
    ignore_value: int | None = None  # a raw label value meaning "unlabelled"
    reduce_zero_label: bool = False  # ADE20K: raw 0 -> ignore, raw k -> k - 1
    class_names: tuple[str, ...] = ()  # for the per-class table ("class i" when empty)
    # a label outside 0..C-1 (other than the ignore value) is an error; true ignores it instead
    ignore_other_labels: bool = False
    palette: str = ""  # the dataset's customary class colours, RRGGBB per class ("": none)

    def names(self) -> list[str]:
        return list(self.class_names) or [f"class {i}" for i in range(self.num_classes)]

    def colors(self) -> np.ndarray | None:
        """The palette as (num_classes, 3) uint8 RGB; None without one."""
        if not self.palette:
            return None
        return np.frombuffer(bytes.fromhex(self.palette), np.uint8).reshape(-1, 3)

    def convert(self, raw: np.ndarray) -> torch.Tensor:
        lab = torch.from_numpy(raw.astype(np.int64))
        if self.reduce_zero_label:  # mmseg's: 0 -> 255, k -> k - 1, and 255 (254 then) -> 255
            lab = torch.where(lab == 0, IGNORE + 1, lab) - 1
            lab = torch.where(lab == IGNORE - 1, IGNORE, lab)
        if self.ignore_value is not None:
            lab = torch.where(
                torch.from_numpy(raw.astype(np.int64)) == self.ignore_value, IGNORE, lab
            )
        inside = (lab >= 0) & (lab < self.num_classes)
        if not self.ignore_other_labels:
            bad = ~inside & (lab != IGNORE)
            if bad.any():
                raw_values = sorted(int(v) for v in torch.from_numpy(raw)[bad].unique()[:8])
                mapped = sorted(int(v) for v in lab[bad].unique()[:8])
                how = (f" (classes {mapped} after reduce_zero_label's shift by one)"
                       if self.reduce_zero_label else "")  # fmt: skip
                raise LabelError(
                    f"label values {raw_values} in the file{how} are outside the "
                    f"{self.num_classes} classes 0..{self.num_classes - 1}; set "
                    "data.ignore_other_labels=true to ignore them"
                )
        return torch.where(inside, lab, IGNORE)


# ADE20K's 150 classes by the first name of each objectInfo150.txt entry, as mmseg's per-class
# table names them
ADE20K_NAMES = """
    wall | building | sky | floor | tree | ceiling | road | bed | windowpane | grass |
    cabinet | sidewalk | person | earth | door | table | mountain | plant | curtain | chair
    | car | water | painting | sofa | shelf | house | sea | mirror | rug | field | armchair
    | seat | fence | desk | rock | wardrobe | lamp | bathtub | railing | cushion | base |
    box | column | signboard | chest of drawers | counter | sand | sink | skyscraper |
    fireplace | refrigerator | grandstand | path | stairs | runway | case | pool table |
    pillow | screen door | stairway | river | bridge | bookcase | blind | coffee table |
    toilet | flower | book | hill | bench | countertop | stove | palm | kitchen island |
    computer | swivel chair | boat | bar | arcade machine | hovel | bus | towel | light |
    truck | tower | chandelier | awning | streetlight | booth | television receiver |
    airplane | dirt track | apparel | pole | land | bannister | escalator | ottoman | bottle
    | buffet | poster | stage | van | ship | fountain | conveyer belt | canopy | washer |
    plaything | swimming pool | stool | barrel | basket | waterfall | tent | bag | minibike
    | cradle | oven | ball | food | step | tank | trade name | microwave | pot | animal |
    bicycle | lake | dishwasher | screen | blanket | sculpture | hood | sconce | vase |
    traffic light | tray | ashcan | fan | pier | crt screen | plate | monitor | bulletin
    board | shower | radiator | glass | clock | flag
"""
# the colours ADE20K's figures use (mmseg's ADE20KDataset palette), in class order
ADE20K_PALETTE = """
787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d
787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0
0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06
ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00
ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff 0bc8c8 ff5200 00fff5 003dff 00ff70
00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99
ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52
000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00
08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff
9900ff 47ff00 ff00a3 ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00
00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8
005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff
"""
ADE20K = LabelSpec(
    num_classes=150,
    reduce_zero_label=True,
    class_names=tuple(" ".join(n.split()) for n in ADE20K_NAMES.split("|")),
    palette=ADE20K_PALETTE,
)
CAMVID = LabelSpec(
    num_classes=11,
    ignore_value=11,
    class_names=("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car",
                 "pedestrian", "bicyclist"),
    # SegNet's CamVid colours (the source of these labels)
    palette="808080 800000 c0c080 804080 3c28de 808000 c08080 404080 400080 404000 0080c0",
)  # fmt: skip


class SegFolder(torch.utils.data.Dataset):
    """Pairs ``images/<split>/<name>.<jpg|png>`` with ``annotations/<split>/<name>.png`` (the
    ADEChallengeData2016 and CamVid layouts). A missing label file is an error naming it.

    Returns (image uint8 (3, H, W), label int64 (H, W) in 0..C-1 or ``IGNORE``, name).
    """

    def __init__(self, root: str | Path, split: str, spec: LabelSpec, skip_unreadable=False,
                 names: list[str] | None = None):  # fmt: skip
        self.root, self.spec, self.skip = Path(root), spec, skip_unreadable
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
        if names is not None:  # only these images (small checks), in the folder's order
            stems = {p.stem for p, _ in self.items}
            unknown = [n for n in names if n not in stems]
            if unknown:
                raise FileNotFoundError(
                    f"no image named {unknown[0]!r} in {img_dir}"
                    f"{f' ({len(unknown) - 1} more)' if unknown[1:] else ''}"
                )
            self.items = [(p, lab) for p, lab in self.items if p.stem in set(names)]

    def __len__(self) -> int:
        return len(self.items)

    def raw_label(self, i: int) -> np.ndarray:
        return np.array(Image.open(self.items[i][1]))

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lab_path = self.items[i]
        img = torch.from_numpy(np.array(load_rgb(img_path))).permute(2, 0, 1)
        raw = self.raw_label(i)
        if raw.shape != tuple(img.shape[1:]):
            raise LabelError(f"{lab_path}: a {raw.shape} label map for a {tuple(img.shape[1:])} "
                             f"image ({img_path})")  # fmt: skip
        try:
            return img, self.spec.convert(raw)
        except LabelError as e:
            raise LabelError(f"{lab_path}: {e}") from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """An unreadable image is skipped for the next (``skip_unreadable``) or is an error
        naming it; a label map of another size or with unknown labels is an error naming it."""
        i, (img, label), _ = read_or_skip(self.load, lambda j: str(self.items[j][0]), i,
                                          len(self.items), skip=self.skip)  # fmt: skip
        return img, label, self.items[i][0].stem


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` (``Resize(scale, keep_ratio=True)``): the largest size with the
    long side at most ``max(scale)`` and the short side at most ``min(scale)``, rounded half
    up."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_u8(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (h, w[, 3]) with OpenCV, bilinear (or nearest, for labels) without
    antialiasing, as mmcv resizes."""
    import cv2

    h, w = size
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an (H, W, 3) uint8 RGB image, each step with
    probability 0.5: brightness +-32 and contrast x[0.5, 1.5] on uint8 with clipping (contrast
    first or last at random), saturation x[0.5, 1.5] on HSV's S, hue +-18 OpenCV units (+-36
    degrees), HSV by OpenCV as mmcv converts."""
    import cv2

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if rng.integers(2):  # brightness
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):  # saturation
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):  # hue
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0:
        img = contrast(img)
    return img


class SegAugment(torch.utils.data.Dataset):
    """mmsegmentation's UperNet training pipeline on a ``SegFolder``, every draw from the sample's
    seed: ``RandomResize`` (ratio in ``ratio_range`` of ``scale``, aspect kept; OpenCV on uint8,
    labels nearest), ``RandomCrop`` of ``crop`` x ``crop`` in which no class covers
    ``cat_max_ratio`` or more of the labelled pixels (up to 10 redraws, then the 11th window as it
    is), ``RandomFlip`` (0.5), ``PhotoMetricDistortion``; then the data preprocessor's
    normalisation and zero padding to the crop (labels padded with ``IGNORE``).

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
        if folder.spec.num_classes >= IGNORE:
            raise ValueError(f"labels are resized as uint8: at most {IGNORE - 1} classes")
        self.folder, self.crop, self.scale = folder, crop, tuple(scale)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio

    def __len__(self) -> int:
        return len(self.folder)

    def crop_window(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """mmseg's ``RandomCrop.crop_bbox``: the top-left corner of the crop."""
        c = self.crop

        def draw():
            return (int(rng.integers(0, max(label.shape[0] - c, 0) + 1)),
                    int(rng.integers(0, max(label.shape[1] - c, 0) + 1)))  # fmt: skip

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                values, counts = np.unique(label[top : top + c, left : left + c],
                                           return_counts=True)  # fmt: skip
                counts = counts[values != IGNORE]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
        return top, left

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from crossmae.data import normalize_pixels

        index, seed = key
        rng = np.random.default_rng(seed)
        img, label, _ = self.folder[index]
        img = img.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        label = label.numpy().astype(np.uint8)  # classes < 255, IGNORE = 255
        lo, hi = self.ratio_range
        r = rng.random() * (hi - lo) + lo
        size = rescale_size(*label.shape, (int(self.scale[0] * r), int(self.scale[1] * r)))
        img, label = resize_u8(img, size), resize_u8(label, size, nearest=True)
        top, left = self.crop_window(label, rng)
        c = self.crop
        img, label = img[top : top + c, left : left + c], label[top : top + c, left : left + c]
        if rng.random() < 0.5:
            img, label = img[:, ::-1], label[:, ::-1]
        img = photometric_distortion(np.ascontiguousarray(img), rng)
        x = normalize_pixels(torch.from_numpy(img).permute(2, 0, 1))
        lab = torch.from_numpy(np.ascontiguousarray(label)).long()
        ph, pw = c - x.shape[1], c - x.shape[2]
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))  # zeros after normalising
        lab = torch.nn.functional.pad(lab, (0, pw, 0, ph), value=IGNORE)
        return x, lab


def label_spec(cfg) -> LabelSpec:
    """The labels of a ``SegConfig.data`` section's dataset."""
    if cfg.dataset == "ade20k":
        return ADE20K
    if cfg.dataset == "camvid":
        return CAMVID
    if cfg.dataset == "custom":
        return LabelSpec(cfg.num_classes, cfg.ignore_value, cfg.reduce_zero_label,
                         ignore_other_labels=cfg.ignore_other_labels)  # fmt: skip
    raise ConfigError(f"dataset must be ade20k, camvid or custom, got {cfg.dataset!r}")
