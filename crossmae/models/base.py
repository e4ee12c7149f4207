"""What MAE (arXiv:2111.06377) and CrossMAE (arXiv:2401.14391) pretraining models share: the ViT
encoder run on visible patches, the mask, the choice of encoder feature maps for inter-block
attention, and the pixel target.

Mask convention: ``mask[n, l] = 1`` where patch ``l`` is predicted, 0 where visible or ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels
from .masking import (
    MaskCounts,
    MaskSampler,
    gather_tokens,
    mask_counts,
    normalize_patches,
    patchify,
)
from .vit import VisionTransformer, grid_of


def resolve_use_fm(use_fm: Sequence[int], depth: int) -> list[int]:
    """Encoder blocks whose outputs feed inter-block attention, in the official ``use_fm`` form:
    ``[-1]`` alone = every block; otherwise block indices, negatives counting from the end."""
    use_fm = [int(i) for i in use_fm]
    if not use_fm:
        raise ValueError("use_fm is empty: name at least one encoder block (or [-1] for all)")
    if use_fm == [-1]:
        return list(range(depth))
    bad = [i for i in use_fm if not -depth <= i < depth]
    if bad:
        raise ValueError(f"use_fm indices {bad} are out of range for an encoder of depth {depth}")
    out = [i % depth for i in use_fm]
    if len(set(out)) != len(out):
        raise ValueError(f"use_fm {use_fm} names an encoder block twice")
    return sorted(out)


class MaskedAutoencoderBase(nn.Module):
    """Encoder half of a masked autoencoder; subclasses add the decoder and the loss.

    Built from the subclass's constructor arguments (``config``), of which it reads:
    img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_eps,
    drop_path_rate (the ViT encoder); mask_ratio (p); masking (``"random"``, or ``"grid"``: keep one
    of every four, Table 15); norm_pix_loss; weight_fm (inter-block attention over several encoder
    maps; False = the last map after the encoder's final ``norm``); use_fm (encoder blocks feeding
    inter-block attention, official form: ``resolve_use_fm``); use_input (also feed the encoder's
    input tokens, cls + visible patches).
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        c = config
        patch_size, weight_fm = c["patch_size"], c["weight_fm"]
        self.encoder = VisionTransformer(
            img_size=c["img_size"],
            patch_size=patch_size,
            in_chans=c["in_chans"],
            embed_dim=c["embed_dim"],
            depth=c["depth"],
            num_heads=c["num_heads"],
            mlp_ratio=c["mlp_ratio"],
            drop_path_rate=c["drop_path_rate"],
            norm_eps=c["norm_eps"],
            final_norm=not weight_fm,
        )
        self.patch_size = patch_size
        self.grid_size = grid_of(c["img_size"], patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_sampler = MaskSampler(self.grid_size, c["masking"])
        self.mask_ratio = c["mask_ratio"]
        self.masking = c["masking"]
        self.norm_pix_loss = c["norm_pix_loss"]
        self.weight_fm = weight_fm
        self.use_input = c["use_input"]
        self.fm_blocks = frozenset(resolve_use_fm(c["use_fm"], c["depth"]))
        self.num_maps = len(self.fm_blocks) + int(self.use_input) if weight_fm else 1
        # for uint8 inputs (``pixels_to_input``); not part of checkpoints
        for name, value in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
            t = torch.tensor(value, dtype=torch.float32).view(3, 1, 1)
            self.register_buffer(name, t, persistent=False)

    # ----------------------------------------------------------------------------- mask
    def mask_counts(self, mask_ratio: float, pred_ratio: float | None) -> MaskCounts:
        """Visible / ignored / predicted counts for these ratios (errors on invalid ones)."""
        if self.masking == "grid" and mask_ratio != 0.75:
            raise ValueError(
                f"grid masking keeps one patch in four: mask_ratio must be 0.75, got {mask_ratio}"
            )
        return mask_counts(self.num_patches, mask_ratio, pred_ratio)

    def pixels_to_input(self, imgs: torch.Tensor) -> torch.Tensor:
        """The forward's images: uint8 pixels (N, 3, H, W) are ImageNet-normalised here (inside a
        compiled step, fused into its first kernels); normalised floats pass through."""
        if imgs.dtype != torch.uint8:
            return imgs
        return normalize_pixels(imgs, self.pixel_mean, self.pixel_std)

    def make_mask(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        pred_ratio: float | None,
        ids_shuffle: torch.Tensor | None,
    ) -> tuple[MaskCounts, torch.Tensor]:
        """Counts of the split and the (N, L) permutation (drawn here unless given)."""
        counts = self.mask_counts(mask_ratio, pred_ratio)
        N = imgs.shape[0]
        if ids_shuffle is None:
            ids_shuffle = self.mask_sampler(N, imgs.device)
        elif tuple(ids_shuffle.shape) != (N, self.num_patches) or ids_shuffle.is_floating_point():
            raise ValueError(
                f"ids_shuffle must be an integer tensor of shape (N, L) = ({N}, "
                f"{self.num_patches}), got {ids_shuffle.dtype} {tuple(ids_shuffle.shape)}"
            )
        return counts, ids_shuffle

    # ----------------------------------------------------------------------------- encoder
    def encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder on the visible patches.

        Returns the feature maps the decoder reads, each (N, 1 + n_keep, D) with the cls token
        first: with ``weight_fm`` the input tokens (if ``use_input``) then the outputs of the
        ``fm_blocks``; without it, the last block's output after the encoder's ``norm``.
        """
        enc = self.encoder
        x = enc.visible_patch_tokens(imgs, ids_keep)  # (N, n_keep, D)
        x = enc.prepend_cls(x)  # (N, 1 + n_keep, D)
        maps = [x] if self.weight_fm and self.use_input else []
        for i in range(enc.depth):
            x = enc.run_block(i, x)
            if self.weight_fm and i in self.fm_blocks:
                maps.append(x)
        return maps if self.weight_fm else [enc.norm(x)]

    # ----------------------------------------------------------------------------- target
    def pixel_target(self, imgs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Regression target (N, L or n, p*p*C): patches at ``ids`` (all if None), per-patch
        normalised with ``norm_pix_loss``."""
        target = patchify(imgs, self.patch_size)
        if ids is not None:
            target = gather_tokens(target, ids)
        if self.norm_pix_loss:
            target = normalize_patches(target)[0]
        return target
