"""Datasets, transforms and loaders."""

from .datasets import BuiltinPhotos, ImageFiles, load_rgb
from .loader import PretrainSamples, ResumableSampler, collate, make_loader, sample_seed
from .transforms import EvalTransform, PretrainTransform, denormalize

__all__ = [
    "BuiltinPhotos",
    "EvalTransform",
    "ImageFiles",
    "PretrainSamples",
    "PretrainTransform",
    "ResumableSampler",
    "collate",
    "denormalize",
    "load_rgb",
    "make_loader",
    "sample_seed",
]
