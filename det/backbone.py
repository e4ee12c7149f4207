"""ViTDet backbone and simple feature pyramid: Li, Mao, Girshick, He, "Exploring Plain Vision
Transformer Backbones for Object Detection", arXiv:2203.16527 (Sec. 3, Fig. 2), as detectron2's
``projects/ViTDet`` builds them (``modeling/backbone/vit.py``), module for module.

The plain ViT keeps the timm / MAE parameter names (``patch_embed.proj``, ``pos_embed``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``), so a pretraining
checkpoint loads into it; new are the decomposed relative-position tables
``blocks.{i}.attn.rel_pos_{h,w}`` (zero-initialised). Most blocks attend within windows; a few
evenly spaced blocks attend globally. The absolute position table stays the pretraining one
(cls slot included) and is resampled to the input's grid on every forward, as detectron2's
``get_abs_pos`` does. The pyramid's modules are named as detectron2 names them
(``simfp_2`` ... ``simfp_5``), so a detectron2 state dict loads without renaming.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from crossmae.checkpoint import load_state_dict_strict
from crossmae.models.layers import (
    NORM_EPS,
    PatchEmbed,
    adapt_encoder_state,
    run_block,
)
from crossmae.models.pos_embed import resample_abs_pos_embed


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> windows (B * nW, window, window, C), padding H and W with zeros up to
    multiples of ``window``; returns the padded size too."""
    B, H, W, C = x.shape
    pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """The inverse of ``window_partition``: (B * nW, window, window, C) -> (B, H, W, C)."""
    Hp, Wp = padded
    B = windows.shape[0] // (Hp * Wp // window // window)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, : size[0], : size[1]].contiguous()


def relative_positions(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Embeddings (q_size, k_size, head_dim) of the relative offsets between q and k positions,
    read from ``table`` (2 * size - 1, head_dim), linearly resampled if its length differs."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a (H, W) token grid with decomposed relative position bias
    (MViTv2, arXiv:2112.01526): bias[q, k] = <q, R_h[qh - kh]> + <q, R_w[qw - kw]>.

    Args:
        dim: token width.
        num_heads: attention heads.
        size: grid side the tables are made for (the window, or the whole grid if global).
    """

    def __init__(self, dim: int, num_heads: int, size: int, explicit: bool = False):
        super().__init__()
        self.num_heads, self.explicit = num_heads, explicit
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(B, H * W, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, H*W, head_dim)
        Rh = relative_positions(H, H, self.rel_pos_h)  # (H, H, head_dim)
        Rw = relative_positions(W, W, self.rel_pos_w)  # (W, W, head_dim)
        r_q = q.reshape(B, h, H, W, C // h)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)  # (B, heads, H, W, H)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)  # (B, heads, H, W, W)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, h, H * W, H * W)
        if self.explicit:  # detectron2's: logits, + bias, softmax, @ v
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, H, W, C))  # (B, H, W, C)


class ViTDetBlock(nn.Module):
    """Pre-norm block on a (B, H, W, C) grid, attending within windows (``window > 0``) or
    globally (``window == 0``)."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path, window: int, grid: int, norm_eps,
                 explicit: bool = False):  # fmt: skip
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RelPosAttention(dim, num_heads, window if window else grid, explicit)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window:
            size = x.shape[1:3]
            x, padded = window_partition(x, self.window)
            x = window_unpartition(self.attn(x), self.window, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def global_block_indices(depth: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced global-attention blocks, the last one last: ViT-B (12) -> 2, 5,
    8, 11; ViT-L (24) -> 5, 11, 17, 23; ViT-H (32) -> 7, 15, 23, 31 (the ViTDet settings)."""
    step = depth // count
    return [step * (i + 1) - 1 for i in range(count)]


class ViTDetBackbone(nn.Module):
    """Plain ViT for detection: (B, 3, H, W) -> the last feature map (B, D, H/p, W/p).

    Args:
        img_size: detection input side (1024); sizes the global blocks' relative tables.
        pretrain_img_size: the pretraining input side; the absolute position table keeps its
            grid (``pretrain_img_size / patch_size``) and a cls slot, as detectron2's ViT.
        patch_size, embed_dim, depth, num_heads, mlp_ratio, norm_eps: the pretrained encoder's.
        drop_path_rate: stochastic depth (0.1 B, 0.4 L, 0.5 H in ViTDet).
        window: window side in tokens (14).
        global_blocks: blocks with global attention (default: 4 evenly spaced).
        explicit_attention: detectron2's attention arithmetic instead of SDPA (``DetModel``).
    """

    def __init__(
        self,
        img_size: int = 1024,
        pretrain_img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_eps: float = NORM_EPS,
        drop_path_rate: float = 0.1,
        window: int = 14,
        global_blocks: Sequence[int] | None = None,
        explicit_attention: bool = False,
    ):
        super().__init__()
        for name, size in (("img_size", img_size), ("pretrain_img_size", pretrain_img_size)):
            if size % patch_size:
                raise ValueError(f"{name} {size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.grid = img_size // patch_size
        self.pretrain_grid = pretrain_img_size // patch_size
        self.global_blocks = (
            list(global_blocks) if global_blocks is not None else global_block_indices(depth)
        )
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            ViTDetBlock(embed_dim, num_heads, mlp_ratio, dpr[i],
                        0 if i in self.global_blocks else window, self.grid, norm_eps,
                        explicit_attention)
            for i in range(depth)
        )  # fmt: skip
        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)
        self._init_weights()

    def _init_weights(self) -> None:
        """detectron2's ViT initialisation: truncated normal (std 0.02) for the position table
        and every Linear, zero biases, LayerNorm (1, 0), zero relative tables."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, H, W, D)
        H, W = x.shape[1:3]
        g = self.pretrain_grid
        pos = resample_abs_pos_embed(self.pos_embed, (H, W), (g, g), num_prefix_tokens=1)
        x = x + pos[:, 1:].reshape(1, H, W, -1)  # the cls slot is not used
        for blk in self.blocks:
            x = run_block(blk, x, self.grad_checkpointing)
        return x.permute(0, 3, 1, 2)  # (B, D, H, W)

    def load_pretrained(
        self, state_dict: dict[str, torch.Tensor], pretrain_grid: tuple[int, int]
    ) -> None:
        """Load an encoder state dict (timm names) strictly: ``cls_token`` and ``norm.*`` are
        dropped on purpose (ViTDet uses neither); a patch embedding of another patch size and its
        position table are resampled to this backbone's patch size (detectron2 runs ViT-H/14
        weights at stride 16, converted this way); only the relative-position tables may be
        missing."""
        sd = adapt_encoder_state(state_dict, patch_size=self.patch_size,
                                 grid=(self.pretrain_grid,) * 2, pretrain_grid=pretrain_grid,
                                 drop=("norm.", "cls_token"))  # fmt: skip
        new = {k for k in self.state_dict() if ".rel_pos_" in k}
        load_state_dict_strict(self, sd, allow_missing=new, what="pretrained encoder")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map: detectron2's ``LN`` norm (its own
    module, not ``nn.LayerNorm``, which matters for detectron2's weight-decay rule).

    Args:
        channels: C.
        eps: added to the variance (detectron2: 1e-6).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNorm(nn.Conv2d):
    """A convolution followed by an optional norm and activation, under one module (detectron2's
    ``layers.Conv2d``: state keys ``weight``, ``bias``, ``norm.weight``, ``norm.bias``).

    Args:
        in_channels, out_channels, kernel_size, padding: as ``nn.Conv2d``.
        norm: a LayerNorm2d over ``out_channels`` (and no conv bias) if true.
        relu: a ReLU after the norm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 padding: int = 0, norm: bool = True, relu: bool = False):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=not norm)
        self.norm = LayerNorm2d(out_channels) if norm else None
        self.relu = relu
        msra_fill_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


def msra_fill_(module: nn.Module) -> None:
    """detectron2's ``c2_msra_fill``: Kaiming-normal weights (fan-out, ReLU gain), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


PYRAMID_LEVELS = ("p2", "p3", "p4", "p5", "p6")  # strides 4, 8, 16, 32, 64


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Fig. 2c): from the stride-16 map, deconvolutions to
    strides 4 and 8, identity at 16, max-pool to 32; each level a 1x1 then a 3x3 convolution to
    ``out_channels`` with LayerNorm; plus p6 = p5 max-pooled with kernel 1, stride 2 (detectron2's
    ``LastLevelMaxPool``).

    Args:
        net: the ViT.
        out_channels: pyramid width (256).

    Returns an OrderedDict ``p2 ... p6`` (strides 4 ... 64).
    """

    def __init__(self, net: ViTDetBackbone, out_channels: int = 256):
        super().__init__()
        if net.patch_size != 16:
            raise ValueError("the simple feature pyramid scales assume a stride-16 backbone")
        self.net = net
        self.out_channels = out_channels
        D = net.embed_dim
        # module names are detectron2's: simfp_{log2 stride}
        self.simfp_2 = nn.Sequential(
            nn.ConvTranspose2d(D, D // 2, 2, 2), LayerNorm2d(D // 2), nn.GELU(),
            nn.ConvTranspose2d(D // 2, D // 4, 2, 2), *self._convs(D // 4, out_channels),
        )  # fmt: skip
        self.simfp_3 = nn.Sequential(
            nn.ConvTranspose2d(D, D // 2, 2, 2), *self._convs(D // 2, out_channels)
        )
        self.simfp_4 = nn.Sequential(*self._convs(D, out_channels))
        self.simfp_5 = nn.Sequential(nn.MaxPool2d(2, 2), *self._convs(D, out_channels))

    @staticmethod
    def _convs(in_dim: int, out_dim: int) -> list[nn.Module]:
        return [ConvNorm(in_dim, out_dim, 1), ConvNorm(out_dim, out_dim, 3, padding=1)]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feat = self.net(x)  # (B, D, H/16, W/16)
        out = OrderedDict()
        for name, stage in zip(PYRAMID_LEVELS, (self.simfp_2, self.simfp_3, self.simfp_4,
                                                self.simfp_5), strict=False):  # fmt: skip
            out[name] = stage(feat)
        out["p6"] = F.max_pool2d(out["p5"], kernel_size=1, stride=2)
        return out


def pyramid_strides() -> dict[str, int]:
    """Stride of each pyramid level."""
    return {name: 2 ** (i + 2) for i, name in enumerate(PYRAMID_LEVELS)}
