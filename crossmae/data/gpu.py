"""GPU image pipeline: loader workers only read JPEG bytes and draw each sample's crop box, flip
and mask (from the sample's seed, in the same order as ``PretrainTransform``); the device decodes
(``torchvision.io.decode_jpeg``, nvJPEG on CUDA) and crops / resizes / flips / normalises. For
when CPU decoding cannot keep up with the step rate (``data.gpu_decode=true``).
"""

from __future__ import annotations

import io
import logging

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .datasets import ImageFiles, read_or_skip
from .transforms import IMAGENET_MEAN, IMAGENET_STD, rrc_params

log = logging.getLogger("crossmae")


class JpegSamples(torch.utils.data.Dataset):
    """Raw samples of an ``ImageFiles`` source: encoded bytes, crop box, flip, mask.

    Args:
        source: an ``ImageFiles`` folder.
        size: output side (the crop is resized on the device).
        mask_sampler: ``(n, device, generator) -> (n, L)`` or None.
        scale: RandomResizedCrop area range.
    """

    def __init__(self, source: ImageFiles, size: int, mask_sampler=None, scale=(0.2, 1.0)):
        if not isinstance(source, ImageFiles):
            raise TypeError("the GPU pipeline reads image files: set data.path to a folder")
        self.source, self.size, self.mask_sampler, self.scale = (
            source,
            size,
            mask_sampler,
            tuple(scale),
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        g = torch.Generator().manual_seed(seed)

        def header(i: int) -> tuple[bytes, int, int]:
            data = self.source.files[i].read_bytes()
            with Image.open(io.BytesIO(data)) as im:  # header only: the size, no decoding
                return data, *im.size

        n = len(self.source)
        i, (data, width, height), skipped = read_or_skip(header, self.source.name, index, n,
                                                         skip=True)  # fmt: skip
        path = self.source.files[i]
        box = rrc_params(height, width, self.scale, (3 / 4, 4 / 3), g)
        flip = bool(torch.rand((), generator=g).item() < 0.5)
        ids = self.mask_sampler(1, None, g)[0] if self.mask_sampler is not None else None
        return {
            "data": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "name": str(path),
            "box": box,
            "flip": flip,
            "ids_shuffle": ids,
            "label": self.source.labels[i],
            "skipped": skipped,
        }


def collate_raw(samples: list[dict]) -> dict:
    """Raw samples -> a batch: lists of bytes / boxes / flips, stacked masks and labels."""
    ids = [s["ids_shuffle"] for s in samples]
    return {
        "data": [s["data"] for s in samples],
        "names": [s["name"] for s in samples],
        "boxes": [s["box"] for s in samples],
        "flips": [s["flip"] for s in samples],
        "ids_shuffle": torch.stack(ids) if ids[0] is not None else None,
        "labels": torch.tensor([s["label"] for s in samples]),
        "skipped": [n for s in samples for n in s["skipped"]],
    }


def _decode_all(batch: dict, device: torch.device) -> list[torch.Tensor]:
    """Decode every image of the batch on ``device`` (batched nvJPEG when all are JPEGs); an
    image that fails is decoded on the CPU, and one that still fails is replaced by its
    neighbour in the batch and reported in ``batch["skipped"]``."""
    try:
        return decode_jpeg(batch["data"], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for data, name in zip(batch["data"], batch["names"], strict=True):
        try:
            out.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
        except RuntimeError as e:
            batch["skipped"].append(f"{name} ({type(e).__name__}: {e})")
            out.append(None)
    good = [i for i, x in enumerate(out) if x is not None]
    if not good:
        raise RuntimeError(f"no image of the batch could be decoded: {batch['names']}")
    for i, x in enumerate(out):
        if x is None:  # use the neighbour's image with this sample's own crop
            out[i] = out[min(good, key=lambda j: abs(j - i))]
    return out


def decode_batch(batch: dict, size: int, device: torch.device) -> torch.Tensor:
    """A ``collate_raw`` batch -> normalised images (N, 3, size, size) on ``device``."""
    imgs = _decode_all(batch, device)
    out = []
    for img, (top, left, h, w), flip in zip(imgs, batch["boxes"], batch["flips"], strict=True):
        h, w = min(h, img.shape[1] - top), min(w, img.shape[2] - left)  # boxes from the header
        crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()  # (1, 3, h, w)
        crop = F.interpolate(
            crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )
        out.append(crop.flip(-1) if flip else crop)
    x = (torch.cat(out) / 255.0).clamp_(0, 1)  # (N, 3, size, size)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
