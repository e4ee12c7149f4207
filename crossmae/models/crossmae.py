"""CrossMAE: Fu, Lian, Wang, Darrell, Malik, "Rethinking Patch Dependence for Masked Autoencoders",
arXiv:2401.14391.

An MAE whose decoder reads the visible encoder tokens through cross-attention only (Sec. 3.2),
reconstructs a random subset of the masked patches (prediction ratio γ <= mask ratio p, Sec. 3.3),
and gives each decoder block its own weighted sum of encoder feature maps (inter-block attention,
Sec. 3.4 and App. A.3).

Mask convention: ``mask[n, l] = 1`` where patch ``l`` is predicted, 0 where visible or ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import MaskedAutoencoderBase
from .layers import NORM_EPS, CrossBlock, InterBlockAttention, init_weights_
from .masking import gather_tokens, split_shuffle
from .pos_embed import sincos_2d
from .vit import init_args


class CrossMAEDecoder(nn.Module):
    """Cross-attention decoder: queries are ``mask_token`` + the position embedding of each
    predicted patch; block i reads keys/values from ``kv_norms[i](IBA mixture i)`` (or, without
    inter-block attention, from the one normalised last encoder map).

    Args:
        num_maps: encoder maps mixed by inter-block attention; None = no inter-block attention.
        grid: patch grid (rows, cols).
        embed_dim: encoder width.
        dim, depth, num_heads, mlp_ratio: decoder width, blocks, heads, MLP ratio.
        patch_pixels: outputs per patch (p * p * C).
        fm_weighting: inter-block attention mode (``layers.IBA_MODES``).
        self_attn: self-attention among queries in every block (the ablation of App. A.4).
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
        self_attn: bool,
        norm_eps: float,
    ):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid), requires_grad=False)  # (1, 1+L, dec)
        if num_maps is not None:
            self.iba = InterBlockAttention(num_maps, depth, embed_dim, fm_weighting)
            self.kv_norms = nn.ModuleList(
                nn.LayerNorm(embed_dim, eps=norm_eps) for _ in range(depth)
            )
        else:
            self.iba = None
        self.blocks = nn.ModuleList(
            CrossBlock(dim, embed_dim, num_heads, mlp_ratio, self_attn, norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_pixels)
        self.fused = True  # fast path of ``key_values``; False = the plain per-block path
        init_weights_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def kv_inputs(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder maps -> the tokens each block reads, each (N, T, embed_dim): its normalised
        inter-block-attention mixture, or the one normalised last map."""
        if self.iba is None:
            return [maps[-1]] * len(self.blocks)
        mixed = self.iba(maps)  # (depth, N, T, embed_dim)
        return [norm(mixed[i]) for i, norm in enumerate(self.kv_norms)]

    def key_values(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder maps -> projected keys/values of each block, each (N, T, 2 * dec).

        Plain path (``fused = False``): per block, LayerNorm then its ``cross_attn.kv`` Linear.
        Fast path: the LayerNorms of all blocks as one op on the stacked mixtures, then each
        block's K/V Linear (one wide product without inter-block attention, where every block
        reads the same map). Same parameters, same numbers.

        The projections stay one product per block: a Linear adds its bias in the matrix
        product's epilogue, whereas a batched product (``baddbmm``) with a broadcast bias first
        copies the bias into its whole output (on an H100, 0.32 ms of a 36 ms ViT-B step).
        """
        kv_layers = [blk.cross_attn.kv for blk in self.blocks]
        if not self.fused:
            return [kv(y) for kv, y in zip(kv_layers, self.kv_inputs(maps), strict=True)]
        if self.iba is None:
            W = torch.cat([kv.weight for kv in kv_layers])  # (depth * 2dec, C)
            b = torch.cat([kv.bias for kv in kv_layers])  # (depth * 2dec,)
            kv = F.linear(maps[-1], W, b)  # (N, T, depth * 2dec)
            return list(kv.chunk(len(kv_layers), dim=-1))
        mixed = self.iba(maps)  # (depth, N, T, C)
        C = mixed.shape[-1]
        gamma = torch.stack([n.weight for n in self.kv_norms])[:, None, None]  # (depth, 1, 1, C)
        beta = torch.stack([n.bias for n in self.kv_norms])[:, None, None]
        y = F.layer_norm(mixed, (C,), eps=self.kv_norms[0].eps) * gamma + beta  # (depth, N, T, C)
        return [kv(y_i) for kv, y_i in zip(kv_layers, y.unbind(0), strict=True)]

    def queries(self, ids_pred: torch.Tensor) -> torch.Tensor:
        """(N, n_pred) patch indices -> (N, n_pred, dec) initial queries."""
        pos = self.pos_embed[:, 1:].expand(ids_pred.shape[0], -1, -1)  # (N, L, dec)
        return self.mask_token + gather_tokens(pos, ids_pred)

    def forward(self, maps: list[torch.Tensor], ids_pred: torch.Tensor) -> torch.Tensor:
        """Returns the prediction (N, n_pred, p*p*C) for the patches ``ids_pred``."""
        x = self.queries(ids_pred)
        for blk, kv in zip(self.blocks, self.key_values(maps), strict=True):
            x = blk(x, kv)
        return self.pred(self.norm(x))


class CrossMAE(MaskedAutoencoderBase):
    """CrossMAE pretraining model.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the cross-attention decoder.
        mask_ratio: p.
        pred_ratio: γ, the fraction of ALL patches predicted (official name ``kept_mask_ratio``).
        masking: ``"random"`` or ``"grid"``.
        norm_pix_loss: regress per-patch normalised pixels.
        weight_fm: inter-block attention; False = every block reads the normalised last map.
        use_fm: encoder blocks mixed by inter-block attention, official form ([-1] = all).
        use_input: include the encoder's input tokens among the mixed maps.
        fm_weighting: ``"linear"`` (paper), ``"softmax"`` (Table 8), ``"linear_proj"`` (Table 9).
        self_attn: add self-attention among queries (ablation).
        drop_path_rate: encoder stochastic depth.
        norm_eps: LayerNorm epsilon.
    """

    kind = "crossmae"  # the official code's name for this model (its checkpoint layout)

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 12,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        pred_ratio: float = 0.75,
        masking: str = "random",
        norm_pix_loss: bool = True,
        weight_fm: bool = True,
        use_fm: Sequence[int] = (-1,),
        use_input: bool = True,
        fm_weighting: str = "linear",
        self_attn: bool = False,
        drop_path_rate: float = 0.0,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__(init_args(locals()))
        self.pred_ratio = pred_ratio
        self.mask_counts(mask_ratio, pred_ratio)  # invalid ratios fail at construction
        self.decoder = CrossMAEDecoder(
            num_maps=self.num_maps if weight_fm else None,
            grid=self.grid_size,
            embed_dim=embed_dim,
            dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            patch_pixels=patch_size**2 * in_chans,
            fm_weighting=fm_weighting,
            self_attn=self_attn,
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
        """One pretraining forward pass.

        Args:
            imgs: (N, C, H, W) normalised images, or uint8 RGB pixels (normalised here).
            mask_ratio, pred_ratio: override the configured p and γ for this call.
            ids_shuffle: (N, L) permutation fixing the mask (the official ``argsort(noise)``).
            with_pred: return ``pred``; a training step passes False, and the full-size
                prediction is never made (in a compiled step, never allocated).

        Returns:
            ``loss`` (scalar, = ``loss_recon``), ``pred`` (N, L, p*p*C; zeros where not
            predicted), ``mask`` (N, L; 1 = predicted), ``ids_shuffle`` (N, L).
        """
        imgs = self.pixels_to_input(imgs)
        p = self.mask_ratio if mask_ratio is None else mask_ratio
        g = self.pred_ratio if pred_ratio is None else pred_ratio
        counts, ids_shuffle = self.make_mask(imgs, p, g, ids_shuffle)
        ids_keep, ids_pred, mask = split_shuffle(ids_shuffle, counts)

        maps = self.encode(imgs, ids_keep)  # each (N, 1 + n_keep, D)
        pred = self.decoder(maps, ids_pred)  # (N, n_pred, p*p*C)

        # loss in the input's precision: mean squared error over all predicted pixels
        target = self.pixel_target(imgs, ids_pred)
        loss = (pred.to(target.dtype) - target).pow(2).mean()

        out = {"loss": loss, "loss_recon": loss, "mask": mask.to(imgs.dtype),
               "ids_shuffle": ids_shuffle}  # fmt: skip
        if with_pred:
            full = pred.new_zeros(imgs.shape[0], self.num_patches, pred.shape[-1])
            index = ids_pred.unsqueeze(-1).expand(-1, -1, pred.shape[-1])
            out["pred"] = full.scatter(1, index, pred)
        return out
