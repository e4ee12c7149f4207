"""The pieces of supervised training on a pretrained encoder (``cls.task``): the training
views of finetuning (timm's RandAugment pipeline) and of the linear probe (MAE's one-draw crop +
flip), and top-1 / top-5 on a val split with exact distributed counting."""

from __future__ import annotations

import torch
import torchvision.transforms as T
from omegaconf import DictConfig
from PIL import Image, ImageOps
from timm.data import create_transform
from torch import nn

from crossmae import distributed as du
from crossmae.data import Labelled, Loader, classify_eval_transform
from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SingleDrawRandomResizedCrop
from crossmae.knn import topk_hits


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the meaning Pillow used to give 0 bits (a black image). RandAugment's
    increasing posterize reaches 0 bits at magnitude 10 (m9 plus magnitude noise), which Pillow
    13 rejects ("bits must be between or equal to 1 and 8") and which would crash a finetune."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, source, img_size: int, device, batch_size: int = 128, workers: int = 2
) -> dict:
    """Top-1 / top-5 on ``source``: each process takes its own shard (no padding) and the
    correct counts are summed, so every image is counted exactly once. Top-5 is None with 5
    classes or fewer (it would always be 100), as ``cls frozen`` reports it."""
    model.eval()
    ds = torch.utils.data.Subset(
        Labelled(source, classify_eval_transform(img_size)),
        du.shard(len(source), du.rank(), du.world_size()),
    )
    counts = torch.zeros(3, device=device)  # top1 hits, top5 hits, images
    for imgs, y, _ in Loader(ds, batch_size=batch_size, num_workers=workers):
        imgs, y = imgs.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(imgs)
        hits = topk_hits(logits.float(), y, ks=(1, 5))
        top5 = hits.get(5, torch.zeros((), device=device, dtype=torch.long))
        counts += torch.stack([hits[1], top5, torch.tensor(len(y), device=device)])
    if du.is_dist():
        torch.distributed.all_reduce(counts)
    model.train()
    top1, top5, n = counts.tolist()
    five = len(source.classes) > 5
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n if five else None, "images": int(n)}


def training_transform(cfg: DictConfig):
    """The training view: the linear probe's crop + flip (MAE's main_linprobe.py), or timm's
    finetuning pipeline (RandAugment, random erasing) with posterize at 0 bits fixed."""
    d = cfg.data
    if cfg.model.probe:
        return T.Compose([
            SingleDrawRandomResizedCrop(d.img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    tf = create_transform(
        d.img_size, is_training=True, auto_augment=d.randaug, interpolation="bicubic",
        re_prob=d.reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    for t in tf.transforms:  # this pipeline's own posterize ops, not timm's table
        for op in getattr(t, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return tf
