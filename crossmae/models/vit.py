"""Vision Transformer encoder (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words",
arXiv:2010.11929) as used by MAE (arXiv:2111.06377) and CrossMAE (arXiv:2401.14391).

Parameter names are timm's ``VisionTransformer`` / the official MAE layout (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.*``, ``norm``, ``fc_norm``, ``head``), so the
state dict of this module is the encoder part of every checkpoint we write and loads into timm.

The classification tasks (cls/, the kNN monitor) use it directly through ``forward_features``,
``layer_id`` and ``set_img_size``; det/ and seg/ have their own backbones (window or
relative-position attention) that take its weights through ``layers.adapt_encoder_state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers import NORM_EPS, Block, PatchEmbed, init_weights_, run_block, vit_layer_id
from .pos_embed import resample_abs_pos_embed, sincos_2d


def init_args(local_vars: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments (its ``locals()``) as a plain dict, for self-describing
    checkpoints: ``type(model)(**model.config)`` rebuilds the model."""
    out = {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected an int or (height, width), got {size}")
    return size


def grid_of(img_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image size; a size that patches do not tile is an error."""
    h, w = to_2tuple(img_size)
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(
            f"image size {h}x{w} is not a positive multiple of the patch size {patch_size}"
        )
    return (h // patch_size, w // patch_size)


class VisionTransformer(nn.Module):
    """ViT encoder with one cls token and a fixed (or trainable) absolute position table.

    Args:
        img_size: input size, int or (height, width); a multiple of ``patch_size``.
        patch_size: patch side in pixels.
        in_chans: image channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        drop_path_rate: stochastic depth, linearly increasing over the blocks up to this value.
        norm_eps: LayerNorm epsilon.
        final_norm: LayerNorm ``norm`` after the last block (absent in CrossMAE with inter-block
            attention and in MAE finetuning with average pooling).
        global_pool: ``"token"`` (cls token) or ``"avg"`` (patch-token mean) in ``forward_head``.
        fc_norm: LayerNorm ``fc_norm`` after pooling (the MAE finetune recipe with ``"avg"``).
        num_classes: classifier width; 0 = no ``head``.
        pos_embed_trainable: whether ``pos_embed`` is a trained parameter (False in pretraining:
            the fixed sin-cos table).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = NORM_EPS,
        final_norm: bool = True,
        global_pool: str = "token",
        fc_norm: bool = False,
        num_classes: int = 0,
        pos_embed_trainable: bool = False,
    ):
        config = init_args(locals())
        super().__init__()
        self.config = config
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = grid_of(self.img_size, patch_size)
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_prefix_tokens = 1
        self.global_pool = global_pool

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, self.grid_size), requires_grad=pos_embed_trainable
        )
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)
        init_weights_(self)
        nn.init.normal_(self.cls_token, std=0.02)

    # ----------------------------------------------------------------------------- embedding
    def check_input(self, imgs: torch.Tensor) -> None:
        """Fail with a clear message on an input the position table does not cover."""
        if imgs.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(imgs.shape)}")
        H, W = imgs.shape[-2:]
        if self.img_size != (H, W):
            raise ValueError(
                f"input is {H}x{W} but this encoder is set up for {self.img_size[0]}x"
                f"{self.img_size[1]} (patch {self.patch_size}); call set_img_size(({H}, {W})) "
                "to resample the position embedding"
            )

    def patch_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, no cls token: (N, L, D) in raster order."""
        self.check_input(imgs)
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def visible_patch_tokens(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """``patch_tokens(imgs)`` at ``ids_keep`` (N, n_keep), computed for those patches only:
        the patch-embedding convolution applied as a Linear to the kept pixel patches, the same
        arithmetic at a fraction of the cost when most patches are masked."""
        self.check_input(imgs)
        N, C, H, W = imgs.shape
        p, cols = self.patch_size, W // self.patch_size
        grid = imgs.reshape(N, C, H // p, p, cols, p).permute(0, 2, 4, 1, 3, 5)  # N r c C p p
        n = torch.arange(N, device=imgs.device)[:, None]
        patches = grid[n, ids_keep // cols, ids_keep % cols].flatten(2)  # (N, n_keep, C*p*p)
        proj = self.patch_embed.proj
        x = nn.functional.linear(patches, proj.weight.flatten(1), proj.bias)
        return x + self.pos_embed[0, 1:][ids_keep]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n, D) -> (N, 1 + n, D) with the cls token (plus its position slot) in front."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def set_img_size(self, img_size: int | Sequence[int]) -> None:
        """Resample the position table to another input size (e.g. 224 -> 448, or non-square)."""
        new_grid = grid_of(img_size, self.patch_size)
        pe = resample_abs_pos_embed(self.pos_embed.data, new_grid, self.grid_size)
        self.pos_embed = nn.Parameter(pe, requires_grad=self.pos_embed.requires_grad)
        self.img_size, self.grid_size = to_2tuple(img_size), new_grid

    # ----------------------------------------------------------------------------- forward
    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on tokens (N, T, D), with activation checkpointing when enabled."""
        return run_block(self.blocks[i], x, self.grad_checkpointing)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> all tokens after the blocks and ``norm``: (N, 1 + L, D)."""
        x = self.prepend_cls(self.patch_tokens(imgs))
        for i in range(self.depth):
            x = self.run_block(i, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (N, 1 + L, D) -> pooled features (N, D) or logits (N, num_classes)."""
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))

    def forward_intermediates(
        self,
        imgs: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """Outputs of selected blocks, as timm's ``forward_intermediates(intermediates_only=True)``.

        Args:
            imgs: (N, C, H, W).
            indices: block indices (negative count from the end), or an int n = the last n blocks;
                None = every block.
            norm: apply the final ``norm`` to each output.
            output_fmt: ``"NCHW"`` -> (N, D, rows, cols) maps; ``"NLC"`` -> (N, L, D) tokens.
            return_prefix_tokens: also return each map's cls token (N, 1, D), as (map, cls) pairs.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self.resolve_block_indices(indices)
        x = self.prepend_cls(self.patch_tokens(imgs))
        outs = []
        for i in range(max(take) + 1):
            x = self.run_block(i, x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, y = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    rows, cols = self.grid_size
                    y = y.transpose(1, 2).reshape(y.shape[0], -1, rows, cols)  # (N, D, rows, cols)
                outs.append((y, prefix) if return_prefix_tokens else y)
        return outs

    def resolve_block_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """Block indices as sorted non-negative ints; out-of-range or repeated ones are errors."""
        if indices is None:
            return list(range(self.depth))
        if isinstance(indices, int):
            if not 0 < indices <= self.depth:
                raise ValueError(f"cannot take the last {indices} of {self.depth} blocks")
            return list(range(self.depth - indices, self.depth))
        out = []
        for i in indices:
            if not -self.depth <= i < self.depth:
                raise ValueError(
                    f"block index {i} is out of range for an encoder of depth {self.depth}"
                )
            out.append(i % self.depth)
        if len(set(out)) != len(out):
            raise ValueError(f"block indices {list(indices)} name a block twice")
        return sorted(out)

    # ----------------------------------------------------------------------------- recipes
    @property
    def num_layers(self) -> int:
        """Layers of layer-wise lr decay below the head: the blocks (``layer_id``)."""
        return self.depth

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (``vit_layer_id``)."""
        return vit_layer_id(name, self.depth)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}
