"""MAE: He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
arXiv:2111.06377 — the baseline of CrossMAE (arXiv:2401.14391).

The decoder is a self-attention transformer over ALL patch positions plus the cls token: the
embedded visible tokens put back at their places and a shared mask token everywhere else. The
loss is the per-patch mean squared error averaged over masked patches only.

With ``weight_fm`` this is "MAE + IBA" (CrossMAE App. A.3, Table 7): the decoder input is one
inter-block-attention mixture of encoder maps instead of the normalised last map.

Mask convention: ``mask[n, l] = 1`` where patch ``l`` is masked (and predicted), 0 where visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import MaskedAutoencoderBase
from .layers import NORM_EPS, Block, InterBlockAttention, init_weights_
from .masking import split_shuffle
from .pos_embed import sincos_2d
from .vit import init_args


class MAEDecoder(nn.Module):
    """Self-attention decoder over all L positions + cls.

    Args:
        num_maps: encoder maps mixed by inter-block attention; None = the single (normalised)
            last encoder map.
        grid: patch grid (rows, cols).
        embed_dim: encoder width.
        dim, depth, num_heads, mlp_ratio: decoder width, blocks, heads, MLP ratio.
        patch_pixels: outputs per patch (p * p * C).
        fm_weighting: inter-block attention mode.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        *,
        num_maps: int | None,
        grid: tuple[int, int],
        embed_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_pixels: int,
        fm_weighting: str,
        norm_eps: float,
    ):
        super().__init__()
        if num_maps is not None:
            self.iba = InterBlockAttention(num_maps, 1, embed_dim, fm_weighting)
            self.kv_norms = nn.ModuleList([nn.LayerNorm(embed_dim, eps=norm_eps)])
        else:
            self.iba = None
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid), requires_grad=False)  # (1, 1+L, dec)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_pixels)
        init_weights_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, maps: list[torch.Tensor], ids_shuffle: torch.Tensor) -> torch.Tensor:
        """maps: each (N, 1 + n_keep, D) -> prediction for every patch (N, L, p*p*C)."""
        latent = maps[-1] if self.iba is None else self.kv_norms[0](self.iba(maps)[0])
        x = self.embed(latent)  # (N, 1 + n_keep, dec)
        N, T, C = x.shape
        L = ids_shuffle.shape[1]
        # tokens in shuffled order (visible first, then mask tokens), scattered to raster order
        shuffled = torch.cat([x[:, 1:], self.mask_token.expand(N, L - (T - 1), C)], dim=1)
        tokens = torch.zeros_like(shuffled).scatter(
            1, ids_shuffle.unsqueeze(-1).expand(-1, -1, C), shuffled
        )  # (N, L, dec)
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed  # (N, 1 + L, dec)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # drop the cls slot: (N, L, p*p*C)


class MAE(MaskedAutoencoderBase):
    """MAE pretraining model (and MAE + IBA with ``weight_fm``).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the self-attention decoder.
        mask_ratio: p.
        masking: ``"random"`` or ``"grid"``.
        norm_pix_loss: regress per-patch normalised pixels.
        weight_fm, use_fm, use_input, fm_weighting: MAE + inter-block attention (Table 7); off by
            default (the encoder then has its final ``norm``).
        drop_path_rate: encoder stochastic depth.
        norm_eps: LayerNorm epsilon.
    """

    kind = "mae"  # the official code's name for this model (its checkpoint layout)

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        masking: str = "random",
        norm_pix_loss: bool = True,
        weight_fm: bool = False,
        use_fm: Sequence[int] = (-1,),
        use_input: bool = True,
        fm_weighting: str = "linear",
        drop_path_rate: float = 0.0,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__(init_args(locals()))
        self.mask_counts(mask_ratio, None)  # invalid ratios fail at construction
        self.decoder = MAEDecoder(
            num_maps=self.num_maps if weight_fm else None,
            grid=self.grid_size,
            embed_dim=embed_dim,
            dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            patch_pixels=patch_size**2 * in_chans,
            fm_weighting=fm_weighting,
            norm_eps=norm_eps,
        )

    def forward(
        self,
        imgs: torch.Tensor,
        *,
        mask_ratio: float | None = None,
        pred_ratio: float | None = None,
        ids_shuffle: torch.Tensor | None = None,
        with_pred: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One pretraining forward pass; ``pred_ratio`` is accepted and ignored (MAE predicts
        every masked patch). ``with_pred=False`` leaves ``pred`` out (a training step: a
        compiled one then need not keep the prediction once the loss is computed). ``imgs``:
        normalised (N, C, H, W) images, or uint8 RGB pixels (normalised here).

        Returns:
            ``loss`` (scalar, = ``loss_recon``), ``pred`` (N, L, p*p*C at every position),
            ``mask`` (N, L; 1 = masked), ``ids_shuffle`` (N, L).
        """
        imgs = self.pixels_to_input(imgs)
        p = self.mask_ratio if mask_ratio is None else mask_ratio
        counts, ids_shuffle = self.make_mask(imgs, p, None, ids_shuffle)
        ids_keep, _, mask = split_shuffle(ids_shuffle, counts)

        maps = self.encode(imgs, ids_keep)  # each (N, 1 + n_keep, D)
        pred = self.decoder(maps, ids_shuffle)  # (N, L, p*p*C)

        # per-patch mean squared error, averaged over masked patches, in the input's precision
        target = self.pixel_target(imgs)
        mask = mask.to(target.dtype)
        per_patch = (pred.to(target.dtype) - target).pow(2).mean(dim=-1)  # (N, L)
        loss = (per_patch * mask).sum() / mask.sum()
        out = {"loss": loss, "loss_recon": loss, "mask": mask, "ids_shuffle": ids_shuffle}
        if with_pred:
            out["pred"] = pred
        return out
