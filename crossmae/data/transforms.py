"""Image transforms driven by an explicit ``torch.Generator``, so that every sample's augmentation
is a pure function of its seed (exact resume, and the same batches for 1 or N processes)."""

from __future__ import annotations

import math

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def rrc_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    g: torch.Generator,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w), torchvision's algorithm on generator ``g``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], g)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], g))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    # fallback: central crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalize_pixels(
    x: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> ImageNet-normalised ``dtype`` (fp32: the same numbers, bit
    for bit on CPU, as ``to_tensor`` + ``normalize`` of the same pixels): ``(x / 255 - mean) /
    std``. ``mean``/``std`` (3, 1, 1) already on the device spare a host-to-device copy (which a
    CUDA graph capture would refuse); by default they are made here."""
    if x.dtype != torch.uint8 or x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected uint8 RGB pixels (..., 3, H, W), got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    if mean is None or std is None:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dtype).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dtype).view(3, 1, 1)
    return (x.to(mean.dtype).div(255) - mean) / std


class PretrainTransform:
    """MAE pretraining augmentation: RandomResizedCrop(size, scale, bicubic) + horizontal flip +
    ImageNet normalisation.

    Args:
        size: output side.
        scale: crop area range as a fraction of the image.
        normalize: False returns the crop's uint8 pixels (3, size, size) instead, for
            ``normalize_pixels`` on the device: a quarter of the bytes to collate, pin and copy,
            and no float work in the data workers (what pretraining uses).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), normalize: bool = True):
        self.size = size
        self.scale = tuple(scale)
        self.normalize = normalize

    def __call__(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = rrc_params(img.height, img.width, self.scale, (3 / 4, 4 / 3), g)
        img = TF.resized_crop(
            img, top, left, h, w, [self.size, self.size], InterpolationMode.BICUBIC
        )
        if torch.rand((), generator=g).item() < 0.5:
            img = TF.hflip(img)
        if not self.normalize:
            return TF.pil_to_tensor(img)  # (3, size, size) uint8
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


class EvalTransform:
    """Deterministic view: resize the shorter side to ``size`` (bicubic), centre crop, normalise."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, g: torch.Generator | None = None) -> torch.Tensor:
        img = TF.resize(img, self.size, InterpolationMode.BICUBIC)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def mae_crop_pct(img_size: int) -> float:
    """MAE's evaluation crop fraction (``util/datasets.py``, ``build_transform``): 224 / 256 up
    to 224 px, 1.0 (resize only, no crop margin) above, e.g. at 448."""
    return 224 / 256 if img_size <= 224 else 1.0


def classify_eval_transform(img_size: int, crop_pct: float | None = None) -> T.Compose:
    """The classification evaluation view, MAE's: resize the shorter side to
    ``int(img_size / crop_pct)`` (bicubic; ``crop_pct`` by default ``mae_crop_pct``), centre
    crop, normalise."""
    crop_pct = mae_crop_pct(img_size) if crop_pct is None else crop_pct
    return T.Compose([
        T.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


class SingleDrawRandomResizedCrop(T.RandomResizedCrop):
    """MAE's linear-probe crop (``util/crop.py``): one draw of area and aspect, the box clamped
    to the image, instead of torchvision's up to 10 tries and a central fallback."""

    @staticmethod
    def get_params(img, scale, ratio) -> tuple[int, int, int, int]:
        width, height = TF.get_image_size(img)
        target = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = min(int(round(math.sqrt(target * aspect))), width)
        h = min(int(round(math.sqrt(target / aspect))), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        left = torch.randint(0, width - w + 1, size=(1,)).item()
        return top, left, h, w


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised (..., 3, H, W) -> pixels in [0, 1]."""
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
