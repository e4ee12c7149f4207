"""Image sources: an ImageFolder tree (ImageNet layout), a flat folder of unlabelled images, and the
photos bundled with scikit-image (the no-download demo). A source lists files up front and loads
one image on demand; loading errors are raised and handled by the caller, which skips and counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("crossmae")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

# real photographs that ship inside scikit-image (public domain / CC0)
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "brick", "grass", "gravel", "coins", "moon", "clock",
)  # fmt: skip


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (truncated or non-image files raise) as 8-bit RGB. 16-bit and 32-bit
    integer images (PIL modes ``I;16*`` and ``I``) are scaled to 0..255 rather than clipped."""
    with Image.open(path) as im:
        if im.mode.startswith("I;16") or im.mode == "I":
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray(np.round(a.clip(0, top) * (255.0 / top)).astype(np.uint8))
        return im.convert("RGB")


T = TypeVar("T")
MAX_CONSECUTIVE_BAD = 50  # unreadable files in a row before a run stops


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; the message names it."""


def read_or_skip(load: Callable[[int], T], name: Callable[[int], str], index: int, n: int,
                 *, skip: bool) -> tuple[int, T, list[str]]:  # fmt: skip
    """``load(index)``; if it fails and ``skip``, the next indices in turn (a warning naming
    each unreadable file). Returns (the index used, what it loaded, the skipped files as
    ``name (error)``). Without ``skip`` (evaluation: every image must count) the failure is an
    ``UnreadableImage`` naming the file."""
    skipped = []
    for attempt in range(MAX_CONSECUTIVE_BAD if skip else 1):
        i = (index + attempt) % n
        try:
            return i, load(i), skipped
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            if isinstance(e, LabelError):
                raise
            problem = f"{name(i)} ({type(e).__name__}: {e})"
            if not skip:
                raise UnreadableImage(f"unreadable image {problem}") from None
            log.warning("skipped unreadable file %s", problem)
            skipped.append(problem)
    raise UnreadableImage(f"{MAX_CONSECUTIVE_BAD} unreadable files in a row, from {name(index)}")


class LabelError(ValueError):
    """A label map that does not fit its image or its dataset's classes; names the file."""


class ImageFiles:
    """Images under ``root``: class sub-folders (ImageFolder: ``root/<class>/**/<img>``) or, when
    ``root`` holds images directly, a flat unlabelled folder (``root/**/<img>``, label -1).

    A missing path, a path that is not a folder, or a folder with no image files is an error
    raised here, before any training starts. Files without an image extension are ignored and
    counted in ``ignored``.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"data path {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"data path {self.root} is not a folder")
        direct = any(_is_image(p) for p in self.root.iterdir())
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        self.files: list[Path] = []
        self.labels: list[int] = []
        self.ignored = 0
        if direct or not subdirs:
            self.layout, self.classes = "flat", []
            self._scan(self.root, -1)
        else:
            self.layout, self.classes = "imagefolder", [d.name for d in subdirs]
            for label, d in enumerate(subdirs):
                self._scan(d, label)
        if not self.files:
            raise FileNotFoundError(
                f"no image files under {self.root} (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        if self.ignored:
            log.warning("%s: ignored %d files without an image extension", self.root, self.ignored)

    def _scan(self, folder: Path, label: int) -> None:
        for p in sorted(folder.rglob("*")):
            if _is_image(p):
                self.files.append(p)
                self.labels.append(label)
            elif p.is_file():
                self.ignored += 1

    def __len__(self) -> int:
        return len(self.files)

    def keep_first_per_class(self, n: int) -> None:
        """Keep only the first ``n`` files (in sorted order) of each class (small checks)."""
        seen: dict[int, int] = {}
        keep = []
        for i, label in enumerate(self.labels):
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= n:
                keep.append(i)
        self.files = [self.files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]

    def name(self, i: int) -> str:
        return str(self.files[i])

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.files[i])


class Labelled(torch.utils.data.Dataset):
    """(image tensor, label, index) of an ``ImageFiles`` source through a torchvision transform.
    ``skip_unreadable`` (training): an unreadable file is replaced by the next readable one and
    reported; otherwise it is an error naming it."""

    def __init__(self, source: ImageFiles, transform, skip_unreadable: bool = False):
        self.source, self.transform, self.skip = source, transform, skip_unreadable

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i, img, _ = read_or_skip(self.source.load, self.source.name, i, len(self.source),
                                 skip=self.skip)  # fmt: skip
        return self.transform(img), self.source.labels[i], i


class BuiltinPhotos:
    """scikit-image's bundled photographs, repeated to ``length`` items per epoch (each item is
    then randomly cropped, so an epoch sees ``length`` different crops)."""

    def __init__(self, length: int = 2048, names: tuple[str, ...] = SKIMAGE_PHOTOS):
        import skimage.data

        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.length = length
        self.names = list(names)
        self.photos = []
        for n in names:
            a = np.asarray(getattr(skimage.data, n)())
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            self.photos.append(Image.fromarray(a[..., :3].astype(np.uint8)))

    def __len__(self) -> int:
        return self.length

    def name(self, i: int) -> str:
        return f"skimage.data.{self.names[i % len(self.photos)]}"

    def load(self, i: int) -> Image.Image:
        return self.photos[i % len(self.photos)]
