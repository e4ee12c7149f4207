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

from crossmae.data import Labelled, classify_eval_transform
from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SingleDrawRandomResizedCrop
from crossmae.evaluation import DatasetEvaluator, inference_on_dataset
from crossmae.knn import topk_hits
from crossmae.progress import table


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the meaning Pillow used to give 0 bits (a black image). RandAugment's
    increasing posterize reaches 0 bits at magnitude 10 (m9 plus magnitude noise), which Pillow
    13 rejects ("bits must be between or equal to 1 and 8") and which would crash a finetune."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-1 / top-5 and each class's top-1 (``per_class``, by class name) of a classifier's
    logits against the labels of ``(images, labels, indices)`` batches. Top-5 is None with 5
    classes or fewer (it would always be 100), as ``cls frozen`` reports it."""

    desc = "classification eval"

    def __init__(self, classes: list[str]):
        self.classes = classes

    def reset(self) -> None:
        C = len(self.classes)
        self.counts = torch.zeros(2)  # top-5 hits, images
        self.per_class = torch.zeros(2, C)  # top-1 hits, images

    def process(self, inputs, outputs: torch.Tensor) -> None:
        y, logits, C = inputs[1].to(outputs.device), outputs.float(), len(self.classes)
        top5 = topk_hits(logits, y, ks=(1, 5)).get(5, torch.zeros((), dtype=torch.long))
        self.counts += torch.stack([top5.cpu(), torch.tensor(len(y))]).float()
        correct = (logits.argmax(dim=1) == y).float().cpu()
        y = y.cpu()
        self.per_class += torch.stack([torch.zeros(C).index_add_(0, y, correct),
                                       torch.bincount(y, minlength=C).float()])  # fmt: skip

    def part(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.counts, self.per_class

    def combine(self, parts: list) -> None:
        self.counts = sum(p[0] for p in parts)
        self.per_class = sum(p[1] for p in parts)

    def evaluate(self) -> dict:
        (top5, n), (hits1, images) = self.counts.tolist(), self.per_class.tolist()
        return {"top1": 100 * sum(hits1) / n, "top5": 100 * top5 / n if len(images) > 5 else None,
                "images": int(n),
                "per_class": class_accuracy(self.classes, hits1, images)}  # fmt: skip


def evaluate_classifier(
    model: nn.Module, source, img_size: int, batch_size: int = 128, workers: int = 2,
    precision: str = "bf16",
) -> dict:  # fmt: skip
    """``ClassificationEvaluator``'s metrics of ``model`` on ``source`` (its evaluation view:
    resize and centre crop to ``img_size``), at ``precision`` (``crossmae.precision``'s names)."""
    dataset = Labelled(source, classify_eval_transform(img_size))
    return inference_on_dataset(model, dataset, ClassificationEvaluator(source.classes),
                                precision=precision, batch_size=batch_size,
                                num_workers=workers)  # fmt: skip


def class_accuracy(names: list[str], hits: list[float], images: list[float]) -> dict[str, dict]:
    """``{class: {"top1": %, "images": n}}`` (top1 None for a class without images)."""
    return {name: {"top1": 100 * h / n if n else None, "images": int(n)}
            for name, h, n in zip(names, hits, images, strict=True)}  # fmt: skip


def per_class_of(pred: torch.Tensor, labels: torch.Tensor, source) -> dict[str, dict]:
    """``class_accuracy`` of predicted classes ``pred`` against ``labels``."""
    C = len(source.classes)
    hits = torch.bincount(labels[pred == labels], minlength=C)
    return class_accuracy(
        source.classes, hits.tolist(), torch.bincount(labels, minlength=C).tolist()
    )


def format_classes(columns: dict[str, dict[str, dict]], most: int = 20) -> str:
    """Per-class top-1 of one or more classifiers (``{column: class_accuracy(...)}``) as one
    table; beyond ``most`` classes only the 5 worst and 5 best of the first column."""
    first = next(iter(columns.values()))
    rows = [[name, *(c[name]["top1"] for c in columns.values()), v["images"]]
            for name, v in first.items()]  # fmt: skip
    title = "per-class top-1:"
    if len(rows) > most:
        rows = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
        rows = [*rows[:5], ["...", *[None] * (len(columns) + 1)], *rows[-5:]]
        title = f"per-class top-1 (the 5 worst and 5 best of {len(first)} classes):"
    return f"{title}\n{table(['class', *columns, 'images'], rows)}"


def training_transform(cfg: DictConfig):
    """The training view: the linear probe's crop + flip (MAE's main_linprobe.py), or timm's
    finetuning pipeline (RandAugment, random erasing) with posterize at 0 bits fixed."""
    d = cfg.data
    if cfg.model.probe:
        return T.Compose([
            SingleDrawRandomResizedCrop(d.img_size, scale=tuple(d.crop_scale),
                                        interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    tf = create_transform(
        d.img_size, is_training=True, scale=tuple(d.crop_scale), auto_augment=d.randaug,
        interpolation="bicubic",
        re_prob=d.reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    for t in tf.transforms:  # this pipeline's own posterize ops, not timm's table
        for op in getattr(t, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return tf
