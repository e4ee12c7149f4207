"""Transformer building blocks shared by the ViT encoder and the MAE / CrossMAE decoders.

Parameter names follow timm's ``vision_transformer.py`` and the official MAE / CrossMAE code
(``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; cross-attention blocks
use ``cross_attn.q``, ``cross_attn.kv``, ``cross_attn.proj``), so checkpoints map one-to-one.
Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp  # stochastic depth; fc1 -> exact GELU -> fc2
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

NORM_EPS = 1e-6


# attention kernels by name ("auto": torch's own choice per call) -> torch.nn.attention.SDPBackend
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}  # fmt: skip


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """A context restricting ``F.scaled_dot_product_attention`` to one backend of
    ``SDPA_BACKENDS``. At ViT-B's short sequences the fastest differs by shape and card
    (``crossmae benchmark attention``)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"attention backend must be one of {sorted(SDPA_BACKENDS)}, got {name!r}")
    if SDPA_BACKENDS[name] is None:
        return contextlib.nullcontext()
    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def sdpa_device_problem(name: str, device_type: str) -> str | None:
    """Why attention backend ``name`` cannot run on ``device_type`` (CUDA-only), or None."""
    if name in ("efficient", "cudnn") and device_type != "cuda":
        return f"{name} is a CUDA kernel; this run is on {device_type}"
    return None


def set_attention_backend(model: nn.Module, name: str) -> nn.Module:
    """Make every attention layer of ``model`` run ``F.scaled_dot_product_attention`` under
    ``sdpa_backend(name)``. The choice lives in the layers' forward, so ``torch.compile`` traces it
    into the graph: a context around the compiled call is read only when it traces, and a cached
    compilation of another backend would silently be reused. Returns ``model``."""
    sdpa_backend(name)  # validates the name
    for m in model.modules():
        if isinstance(m, Attention | CrossAttention):
            m.backend = name
    return model


def run_block(block: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``block(x)``; ``checkpointed`` (in training, with gradients) keeps only the block's input
    and recomputes its activations in backward (non-reentrant ``torch.utils.checkpoint``: drop
    path replays the same random numbers, the step's numbers are unchanged)."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing on (or off) in every backbone of ``model`` that supports it
    (a ``grad_checkpointing`` attribute: the ViT encoders, ViTDet's and the segmentation
    backbone); the number of backbones set."""
    found = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    for m in found:
        m.grad_checkpointing = enabled
    return len(found)


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width.
        num_heads: attention heads; must divide ``dim``.
        qkv_bias: bias on the fused q/k/v projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"  # SDPA kernel, see ``set_attention_backend``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        with sdpa_backend(self.backend):
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x`` (decoder width), keys/values projected from
    encoder tokens ``y``.

    The projection of ``y`` (encoder width) to decoder width lives inside ``kv``, as in CrossMAE
    Sec. 3.2 ("we embed the projection within the multi-head cross-attention module").
    ``forward`` takes the projected keys/values, so a decoder can project outside its blocks
    (``CrossMAEDecoder``: one wide product for all blocks when they read the same map);
    ``project_kv`` is the per-block projection.

    Args:
        dim: query / output width (decoder width).
        kv_dim: width of the key/value tokens (encoder width).
        num_heads: attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.backend = "auto"  # SDPA kernel, see ``set_attention_backend``

    def project_kv(self, y: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, Nk, kv_dim) -> keys and values (B, Nk, 2 * dim)."""
        return self.kv(y)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x (B, Nq, dim) queries, kv (B, Nk, 2 * dim) projected keys/values -> (B, Nq, dim)."""
        B, Nq, C = x.shape
        h = self.num_heads
        q = self.q(x).view(B, Nq, h, C // h).transpose(1, 2)  # (B, heads, Nq, head_dim)
        kv = kv.view(B, kv.shape[1], 2, h, C // h)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, Nk, head_dim)
        with sdpa_backend(self.backend):
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Nq, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, Nq, C))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic-depth probability of both residual branches.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossBlock(nn.Module):
    """CrossMAE decoder block (Fig. 4b): cross-attention from queries to encoder tokens, then MLP.

    With ``self_attn`` the queries first attend to each other (the ablation of Sec. 4.3 / App. A.4,
    Fig. 6: no causal mask): ``x + self_attn(norm0(x))``.

    Args:
        dim: decoder width.
        kv_dim: encoder width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        self_attn: add self-attention among the queries.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        self_attn: bool = False,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        if self_attn:
            self.norm0 = nn.LayerNorm(dim, eps=norm_eps)
            self.self_attn = Attention(dim, num_heads)
        self.has_self_attn = self_attn
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, kv_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x (B, Nq, dim) queries, kv (B, Nk, 2 * dim) projected keys/values."""
        if self.has_self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), kv)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with a strided convolution.

    Args:
        patch_size: square patch side in pixels.
        in_chans: image channels.
        embed_dim: token width.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D), raster order


def resample_patch_weight(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A patch-embedding kernel (D, C, p, p) for another patch size, by timm's pseudo-inverse
    resampling (FlexiViT), e.g. ViT-H/14 weights in a stride-16 detector."""
    if weight.shape[-1] == patch_size:
        return weight
    from timm.layers import resample_patch_embed

    return resample_patch_embed(weight, [patch_size, patch_size])


def vit_layer_id(name: str, depth: int) -> int:
    """Depth of a ViT parameter (timm names) for layer-wise lr decay: embeddings 0, block i ->
    i + 1, the rest (norms, heads) depth + 1: the BEiT / MAE rule, which detectron2's
    ``get_vit_lr_decay_rate`` and mmseg's ``LayerDecayOptimizerConstructor`` also follow."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def adapt_encoder_state(
    state_dict: dict[str, torch.Tensor],
    *,
    patch_size: int,
    grid: tuple[int, int],
    pretrain_grid: tuple[int, int],
    drop: tuple[str, ...] = ("norm.",),
) -> dict[str, torch.Tensor]:
    """A pretrained encoder's state dict (timm names) for a backbone of another input: the keys
    starting with one of ``drop`` removed (e.g. the final ``norm.``, which dense heads do not
    use), the patch kernel resampled to ``patch_size`` and the position table (its cls slot
    kept, a zero one added to a table without) resampled from ``pretrain_grid`` to ``grid``."""
    from .pos_embed import resample_abs_pos_embed

    sd = {k: v for k, v in state_dict.items() if not k.startswith(drop)}
    kernel = sd["patch_embed.proj.weight"].shape[-1]
    if kernel != patch_size:
        logging.getLogger("crossmae").info(
            "the encoder's %d-px patch kernel is resampled to %d px (FlexiViT pseudo-inverse) and "
            "its %dx%d position table to the new grid",
            kernel,
            patch_size,
            *pretrain_grid,
        )
    sd["patch_embed.proj.weight"] = resample_patch_weight(sd["patch_embed.proj.weight"], patch_size)
    pe = sd["pos_embed"]
    n_prefix = pe.shape[1] - pretrain_grid[0] * pretrain_grid[1]
    if n_prefix not in (0, 1):
        raise ValueError(f"pos_embed has {pe.shape[1]} slots for a {pretrain_grid} grid")
    pe = resample_abs_pos_embed(pe, grid, pretrain_grid, num_prefix_tokens=n_prefix)
    if n_prefix == 0:  # a table without cls slot: give it a zero one
        pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
    sd["pos_embed"] = pe
    return sd


def init_weights_(module: nn.Module) -> None:
    """The MAE / CrossMAE initialisation: Xavier-uniform Linear weights (the patch-embedding
    convolution viewed as a Linear), zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


IBA_MODES = ("linear", "softmax", "linear_proj")


class InterBlockAttention(nn.Module):
    """Inter-block attention (CrossMAE Sec. 3.4, Eq. 1): each of ``num_outputs`` decoder blocks
    reads its own weighted sum of ``num_maps`` encoder feature maps, ``t_k = sum_j w_kj f_j``.

    Modes:
        ``"linear"``: the paper's free linear weights (default).
        ``"softmax"``: weights normalised by a softmax over the maps (Table 8).
        ``"linear_proj"``: a Linear projection of each map before the weighted sum (Table 9, "+LP").

    ``weight`` is (num_outputs, num_maps), the layout of the official ``wfm.linear.weight``. It is
    initialised Xavier-uniform: the paper's text says N(0, 1/n), but the official code overwrites
    that with its global Xavier init, which is what the released models were trained with.

    Instead of stacking the maps into (B, N, C, k) and mixing along the trailing axis, the maps are
    stacked on a leading axis and mixed by one (num_outputs, k) @ (k, B*N*C) product.

    Args:
        num_maps: number of encoder feature maps mixed (k).
        num_outputs: number of mixtures (the decoder depth; 1 for MAE + IBA).
        dim: width of the feature maps (used by ``"linear_proj"``).
        mode: one of ``IBA_MODES``.
    """

    def __init__(self, num_maps: int, num_outputs: int, dim: int, mode: str = "linear"):
        super().__init__()
        if mode not in IBA_MODES:
            raise ValueError(f"inter-block attention mode must be one of {IBA_MODES}, got {mode!r}")
        if num_maps < 1:
            raise ValueError("inter-block attention needs at least one feature map")
        self.mode = mode
        self.weight = nn.Parameter(torch.empty(num_outputs, num_maps))
        nn.init.xavier_uniform_(self.weight)
        if mode == "linear_proj":
            self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_maps))

    def mixing_weights(self) -> torch.Tensor:
        """The effective (num_outputs, num_maps) weights."""
        return self.weight.softmax(dim=-1) if self.mode == "softmax" else self.weight

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """maps: k tensors (B, N, C) -> (num_outputs, B, N, C), in the maps'
        dtype (the product itself runs in bf16 under autocast)."""
        if len(maps) != self.weight.shape[1]:
            raise ValueError(f"expected {self.weight.shape[1]} feature maps, got {len(maps)}")
        dtype = maps[0].dtype
        if self.mode == "linear_proj":
            maps = [proj(m) for proj, m in zip(self.proj, maps, strict=True)]
        stacked = torch.stack(maps, dim=0)  # (k, B, N, C)
        w = self.mixing_weights().to(stacked.dtype)
        mixed = w @ stacked.flatten(1)  # (num_outputs, B*N*C), bf16 under autocast
        # back to the maps' precision for the LayerNorm that follows (CUDA's autocast would
        # normalise in fp32 anyway; CPU's would not)
        return mixed.view(w.shape[0], *stacked.shape[1:]).to(dtype)  # (num_outputs, B, N, C)
