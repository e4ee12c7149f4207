"""Checks that need a CUDA device (skipped without one; run by tools/gpu_session.sh). This file
imports only torch, torchvision, PIL and numpy, which the device image has."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae.data import ImageFiles
from crossmae.data.gpu import JpegSamples, collate_raw, decode_batch
from crossmae.models.masking import MaskSampler


@pytest.mark.gpu
def test_nvjpeg_decode_matches_cpu_decode(tmp_path):
    """The batched nvJPEG path gives the CPU path's images (same boxes, flips and masks; the two
    JPEG decoders differ by rounding only)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    for i in range(6):  # smooth real-looking gradients of different sizes and phases
        img = np.stack([np.sin(xx / (7 + i) + c) * np.cos(yy / (9 + c)) for c in range(3)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img[: 96 - 4 * i]).save(tmp_path / f"{i}.jpg", quality=90)
    raw = JpegSamples(ImageFiles(tmp_path), 64, MaskSampler((4, 4)))
    batch = collate_raw([raw[(i, 7 + i)] for i in range(len(raw))])
    cpu = decode_batch(batch, 64, torch.device("cpu"))
    gpu = decode_batch(batch, 64, torch.device("cuda"))
    assert gpu.is_cuda and gpu.shape == cpu.shape == (6, 3, 64, 64)
    # nvJPEG and libjpeg upsample chroma differently: about 1.2 grey levels apart on average
    # (0.0202 in normalised units on an H100), a wrong crop or flip is > 0.3
    assert (gpu.cpu() - cpu).abs().mean().item() < 0.04
    assert not batch["skipped"]
