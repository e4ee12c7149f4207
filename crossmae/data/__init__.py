"""Datasets, transforms and loaders."""

from .datasets import BuiltinPhotos, ImageFiles, Labelled, load_rgb
from .loader import (
    CudaPrefetcher,
    Indexed,
    Loader,
    PretrainSamples,
    ResumableSampler,
    collate,
    ignore_stop_signals,
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
    "Loader",
    "Labelled",
    "PretrainSamples",
    "PretrainTransform",
    "ResumableSampler",
    "classify_eval_transform",
    "collate",
    "denormalize",
    "ignore_stop_signals",
    "load_rgb",
    "make_loader",
    "normalize_pixels",
    "sample_seed",
]
