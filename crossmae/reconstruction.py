"""Reconstructions in pixel space and the masked-patch PSNR (CrossMAE Table 13).

Mask convention: ``mask[n, l] = 1`` where patch ``l`` is predicted, 0 where visible or ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from .data.transforms import denormalize
from .models.masking import normalize_patches, patchify, unpatchify
from .progress import Progress

PSNR_CAP = 100.0  # dB reported for a perfect reconstruction


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    imgs: torch.Tensor,
    ids_shuffle: torch.Tensor,
    *,
    pred_ratio: float | None = None,
) -> dict[str, torch.Tensor]:
    """Run a pretraining model and return images in [0, 1], each (N, 3, H, W):
    ``original``; ``masked`` (visible patches, the rest black); ``pred`` (predictions at predicted
    patches, norm-pix outputs de-normalised with each patch's true mean / std, the rest black);
    ``pasted`` (``pred`` with the visible patches pasted back); the patch masks ``predicted`` and
    ``visible`` (N, L); and the model's ``loss``.

    ``pred_ratio`` overrides γ: a CrossMAE trained with γ < p decodes every masked patch with
    ``pred_ratio = mask_ratio``, since its queries are decoded independently.
    """
    was_training = model.training
    model.eval()
    kw = {} if pred_ratio is None else {"pred_ratio": pred_ratio}
    out = model(imgs, ids_shuffle=ids_shuffle, **kw)
    model.train(was_training)

    p, grid = model.patch_size, model.grid_size
    imgs = imgs.float()
    target = patchify(imgs, p)  # (N, L, p*p*3)
    pred = out["pred"].float()
    if model.norm_pix_loss:
        _, mean, std = normalize_patches(target)
        pred = pred * std + mean
    predicted = out["mask"].float()  # (N, L)
    n_keep = model.mask_counts(model.mask_ratio, None).n_keep
    visible = torch.zeros_like(predicted).scatter_(1, ids_shuffle[:, :n_keep], 1.0)

    def to_image(patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        img = denormalize(unpatchify(patches, p, grid))  # (N, 3, H, W) in [0, 1]
        return img * unpatchify(keep.unsqueeze(-1).expand_as(patches), p, grid)

    return {
        "original": denormalize(imgs),
        "masked": to_image(target, visible),
        "pred": to_image(pred, predicted),
        "pasted": to_image(pred, predicted) + to_image(target, visible),
        "predicted": predicted,
        "visible": visible,
        "loss": out["loss"],
    }


def masked_psnr(
    pred: torch.Tensor, target: torch.Tensor, predicted: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Per-image PSNR (dB) over the predicted patches' pixels, images in [0, 1]: (N,).
    A perfect reconstruction gives ``PSNR_CAP``."""
    grid = (target.shape[-2] // patch_size, target.shape[-1] // patch_size)
    pix = unpatchify(predicted.unsqueeze(-1).expand(-1, -1, patch_size**2), patch_size, grid)
    weight = pix.expand_as(target)  # (N, 3, H, W), 1 on predicted pixels
    mse = ((pred - target) ** 2 * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)
    psnr = -10.0 * torch.log10(mse.clamp_min(10 ** (-PSNR_CAP / 10)))
    return psnr.clamp(max=PSNR_CAP)


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module, loader, device: torch.device, *, pred_ratio: float | None = None
) -> dict[str, float]:
    """Mean loss and mean masked-patch PSNR over a loader of ``collate`` batches (which carry
    their own masks, so the numbers are reproducible). A sample standing in for unreadable
    files is left out: ``images`` counts the images measured, ``skipped_files`` names the
    unreadable ones."""
    losses, psnrs, n, skipped = 0.0, 0.0, 0, []
    with Progress(len(loader), "reconstruction", unit="batch") as bar:
        for batch in loader:
            bar.update()
            skipped += batch["skipped"]
            keep = ~batch["replaced"]
            if not keep.any():
                continue
            imgs = batch["images"][keep].to(device)
            ids = batch["ids_shuffle"][keep].to(device)
            rec = reconstruct(model, imgs, ids, pred_ratio=pred_ratio)
            psnr = masked_psnr(rec["pred"], rec["original"], rec["predicted"], model.patch_size)
            losses += rec["loss"].item() * len(imgs)
            psnrs += psnr.sum().item()
            n += len(imgs)
    if n == 0:
        raise ValueError("evaluate_reconstruction: no readable image to measure")
    return {"loss": losses / n, "psnr": psnrs / n, "images": n,
            "skipped_files": sorted(set(skipped))}  # fmt: skip


def folder_reconstruction_metrics(
    model: nn.Module,
    path: str,
    *,
    images: int = 1000,
    batch_size: int = 128,
    seed: int = 0,
    pred_ratio: float | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss and masked-patch PSNR over ``images`` images spread evenly over a folder (all if
    fewer), each centre-cropped at the model's input size with a mask fixed by ``seed``: the same
    images and masks for every model, so numbers compare."""
    from torch.utils.data import DataLoader

    from .data import EvalTransform, ImageFiles, PretrainSamples, collate, sample_seed

    source = ImageFiles(path)
    n = min(images, len(source))
    keys = [
        (i, sample_seed(seed, i)) for i in torch.linspace(0, len(source) - 1, n).long().tolist()
    ]
    dataset = PretrainSamples(
        source, EvalTransform(model.grid_size[0] * model.patch_size), model.mask_sampler
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, collate_fn=collate)
    return evaluate_reconstruction(
        model.to(device), loader, torch.device(device), pred_ratio=pred_ratio
    )
