"""Datasets, transforms and loaders."""

from .datasets import BuiltinPhotos, ImageFiles, Labelled, load_rgb
from .loader import (
    CudaPrefetcher,
    Indexed,
    PretrainSamples,
    ResumableSampler,
    collate,
    make_loader,
    sample_seed,
)
from .transforms import (
    EvalTransform,
    PretrainTransform,
    classify_eval_transform,
    denormalize,
    normalize_pixels,
)

__all__ = [
    "BuiltinPhotos",
    "CudaPrefetcher",
    "EvalTransform",
    "ImageFiles",
    "Indexed",
    "Labelled",
    "PretrainSamples",
    "PretrainTransform",
    "ResumableSampler",
    "classify_eval_transform",
    "collate",
    "denormalize",
    "load_rgb",
    "make_loader",
    "normalize_pixels",
    "sample_seed",
]
