"""Checks that need a CUDA device (skipped without one; run by tools/gpu_check.sh). This file
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


@pytest.mark.gpu
def test_cuda_random_streams_round_trip_through_a_checkpoint(tmp_path):
    """Every CUDA device's generator is saved and restored (drop path draws on the GPU, so a
    resumed det / seg / finetune run repeats the uninterrupted one only with them)."""
    from crossmae.checkpoint import random_states, restore_random_states

    torch.save(random_states(), tmp_path / "rng.pt")
    expected = [torch.rand(4, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(123)
    restore_random_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = [torch.rand(4, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
