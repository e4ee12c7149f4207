"""``crossmae benchmark data``: images per second of the pretraining pipeline, the CPU
decode per worker and the GPU decode path."""

from __future__ import annotations

import time

import torch

from crossmae.checkpoint import strict_json

from .common import sync


def cmd_data(args) -> int:

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return data_rates(args)
    finally:
        torch.set_num_threads(threads)


def data_rates(args) -> int:
    """``cmd_data``'s measurements (one thread, as a worker)."""
    from crossmae.data import ImageFiles, PretrainSamples, PretrainTransform, sample_seed
    from crossmae.models.masking import MaskSampler

    source = ImageFiles(args.folder)
    n = min(args.images, len(source))
    keys = [(i, sample_seed(0, 0, i)) for i in range(n)]
    grid = (args.img_size // 16, args.img_size // 16)
    # what pretraining runs (uint8 crops, normalised on the device), then the same crops
    # normalised to fp32 in the worker (what the official pipeline does)
    for normalize in (False, True):
        ds = PretrainSamples(
            source, PretrainTransform(args.img_size, normalize=normalize), MaskSampler(grid)
        )
        ds[keys[0]]  # warm the file cache and imports
        t = time.perf_counter()
        for k in keys:
            ds[k]
        cpu_rate = n / (time.perf_counter() - t)
        output = "normalised fp32" if normalize else "uint8"
        rec = {"pipeline": f"cpu decode + RRC + flip (PIL), {output}", "images": n,
               "img_size": args.img_size, "img_per_s_per_worker": cpu_rate,
               "folder": args.folder}  # fmt: skip
        print(strict_json(rec))
    if torch.cuda.is_available() and not args.no_gpu:
        from crossmae.data.gpu import JpegSamples, collate_raw, decode_batch

        device = torch.device("cuda")
        raw = JpegSamples(source, args.img_size, MaskSampler(grid))
        batches = [
            collate_raw([raw[k] for k in keys[i : i + args.batch]]) for i in range(0, n, args.batch)
        ]
        decode_batch(batches[0], args.img_size, device)  # warm-up (nvjpeg init)
        sync(device)
        t = time.perf_counter()
        for b in batches:
            decode_batch(b, args.img_size, device)
        sync(device)
        rate = n / (time.perf_counter() - t)
        rec = {"pipeline": "GPU decode_jpeg + RRC + flip", "images": n, "img_size": args.img_size,
               "img_per_s": rate, "device": torch.cuda.get_device_name()}  # fmt: skip
        print(strict_json(rec))
    return 0
