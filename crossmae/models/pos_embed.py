"""Position embeddings: the fixed 2-D sin-cos table of MAE (He et al. 2022, arXiv:2111.06377) and
the one resampling routine every task uses to move a table to another patch grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1, 1).double() * omega  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(
    embed_dim: int, grid: tuple[int, int], cls_token: bool = True, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The MAE 2-D sin-cos table for a ``grid = (rows, cols)`` patch grid.

    As in MAE, the first half of the channels encodes the column and the second half the row, and
    the cls slot (if any) is all zeros.

    Returns:
        (1, [1 +] rows * cols, embed_dim) in raster order.
    """
    if embed_dim % 4:
        raise ValueError(
            f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}"
        )
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (rows, cols)
    emb = torch.cat([_sincos_1d(embed_dim // 2, c), _sincos_1d(embed_dim // 2, r)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.unsqueeze(0).to(dtype or torch.get_default_dtype())


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Bicubically resample an absolute position table (1, prefix + H*W, D) to another grid.

    Prefix tokens (cls) are kept as they are. ``old_grid`` defaults to a square grid. This is the
    only resampling routine in the project: finetuning at 448, ViTDet at 1024 and UperNet at 512
    all call it.

    timm's ``resample_abs_pos_embed`` does the same interpolation but always in float32: a float64
    table keeps its precision here, which the detectron2 parity test needs (ViTDet resamples on
    every forward; with timm's routine its backbone features are 4e-8 relative off detectron2's
    float64 ones, against 1.6e-15 with this one).
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid_tokens.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} grid tokens are not a square grid: pass old_grid explicitly")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold the table's {n} grid tokens")
    new_grid = tuple(new_grid)
    if tuple(old_grid) == new_grid:
        return pos_embed
    D = pos_embed.shape[-1]
    x = grid_tokens.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, H, W)
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = F.interpolate(x.to(work_dtype), size=new_grid, mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)
