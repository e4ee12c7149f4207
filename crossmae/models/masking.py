"""Masking and pixel targets shared by MAE (arXiv:2111.06377) and CrossMAE (arXiv:2401.14391).

Mask convention, used everywhere in this package: ``mask[n, l] = 1`` where patch ``l`` is predicted
(CrossMAE) / masked (MAE), ``0`` where it is visible or ignored.

A mask is a per-sample permutation ``ids_shuffle`` (N, L) of the patch indices (raster order),
split into three consecutive runs (Sec. 3.3 and the official code):

    ids_shuffle = [ visible (n_keep) | masked, not predicted (n_ignore) | predicted (n_pred) ]

with ``n_keep = int(L * (1 - p))``, ``n_ignore = int(L * (p - γ))`` and the rest predicted. The
int() truncations are the official ones: p = 0.9, γ = 0.1, L = 196 predicts 21 patches, not 19.
MAE is the case γ = p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

MASKINGS = ("random", "grid")


class MaskCounts(NamedTuple):
    n_keep: int
    n_ignore: int
    n_pred: int


def mask_counts(num_patches: int, mask_ratio: float, pred_ratio: float | None = None) -> MaskCounts:
    """Split ``num_patches`` into visible / ignored / predicted counts (module docstring).

    ``pred_ratio`` (γ) is the fraction of ALL patches predicted; None means γ = p (MAE).
    Ratios outside 0 < γ <= p < 1, or a split that leaves nothing visible, are errors; at least
    one patch is always predicted (n_pred >= L * γ > 0).
    """
    L, p = num_patches, float(mask_ratio)
    g = p if pred_ratio is None else float(pred_ratio)
    if not 0.0 < p < 1.0:
        raise ValueError(f"mask_ratio p must satisfy 0 < p < 1, got {p}")
    if not 0.0 < g <= p:
        raise ValueError(
            f"prediction ratio γ must satisfy 0 < γ <= p (mask_ratio={p}), got pred_ratio={g}"
        )
    n_keep = int(L * (1 - p))
    n_ignore = int(L * (p - g))
    n_pred = L - n_keep - n_ignore
    if n_keep < 1:
        raise ValueError(f"mask_ratio {p} leaves no visible patch out of {L}")
    return MaskCounts(n_keep, n_ignore, n_pred)


def random_shuffle(
    n: int,
    num_patches: int,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample uniform random permutation, as the official ``argsort(rand(N, L))``: (N, L)."""
    noise = torch.rand(n, num_patches, device=device, generator=generator)
    return torch.argsort(noise, dim=1)


def grid_shuffle(
    n: int,
    grid: tuple[int, int],
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Grid masking ("keep one of every four", MAE Fig. 6; CrossMAE Table 15): the top-left
    patch of every 2x2 cell comes first (visible), the other patches follow in random order.

    Returns (N, L); needs an even grid so that exactly a quarter of the patches is visible.
    """
    rows, cols = grid
    ids = torch.arange(rows * cols, device=device).view(rows, cols)
    keep = ids[::2, ::2].reshape(-1)  # (L/4,)
    rest = torch.ones(rows, cols, dtype=torch.bool, device=device)
    rest[::2, ::2] = False
    rest = ids[rest]  # (3L/4,)
    order = torch.argsort(torch.rand(n, rest.numel(), device=device, generator=generator), dim=1)
    return torch.cat([keep.expand(n, -1), rest[order]], dim=1)


@dataclass(frozen=True)
class MaskSampler:
    """Draws ``ids_shuffle`` permutations for a patch grid; picklable, so data-loader workers can
    draw each sample's mask from that sample's own generator.

    Args:
        grid: patch grid (rows, cols).
        masking: ``"random"`` or ``"grid"``.
    """

    grid: tuple[int, int]
    masking: str = "random"

    def __post_init__(self):
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.masking == "grid" and (self.grid[0] % 2 or self.grid[1] % 2):
            raise ValueError(f"grid masking needs an even patch grid, got {self.grid}")

    def __call__(
        self, n: int, device: torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n, L) permutations."""
        if self.masking == "grid":
            return grid_shuffle(n, self.grid, device, generator)
        return random_shuffle(n, self.grid[0] * self.grid[1], device, generator)


def split_shuffle(
    ids_shuffle: torch.Tensor, counts: MaskCounts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, L) permutation -> (ids_keep (N, n_keep), ids_pred (N, n_pred), mask (N, L))."""
    n_keep, n_ignore, _ = counts
    ids_keep = ids_shuffle[:, :n_keep]
    ids_pred = ids_shuffle[:, n_keep + n_ignore :]
    mask = torch.zeros(ids_shuffle.shape, device=ids_shuffle.device)
    mask.scatter_(1, ids_pred, 1.0)  # 1 = predicted
    return ids_keep, ids_pred, mask


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, n) -> (N, n, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), pixels ordered (row, col, channel) inside a patch, as MAE."""
    N, C, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(N, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, rows, cols, p, p, C)
    return x.reshape(N, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the inverse of ``patchify``."""
    N, _, P = x.shape
    p, (rows, cols) = patch_size, grid
    C = P // (p * p)
    x = x.reshape(N, rows, cols, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, rows, p, cols, p)
    return x.reshape(N, C, rows * p, cols * p)


def normalize_patches(
    target: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch normalisation of the norm-pix loss (MAE Sec. 3): ``(t - mean) / sqrt(var + eps)``
    with the UNBIASED variance over the patch's pixels, as the official code.

    Returns (normalised target, mean, std) so that ``pred * std + mean`` de-normalises a prediction.
    """
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std
