"""UperNet on a ViT (the MAE / BEiT semantic-segmentation recipe): Xiao et al., "Unified
Perceptual Parsing for Scene Understanding", arXiv:1807.10221; BEiT, arXiv:2106.08254 (Sec. 3.2,
App. C); MAE, arXiv:2111.06377 (A.4).

The backbone is our encoder with, per block, a BEiT relative position bias (zero-initialised)
and layer scale (initialised to 1.0); features after four blocks (ViT-B: 4, 6, 8, 12) without a
final norm become a 4-level pyramid (strides 4, 8, 16, 32) by deconv-BN-GELU-deconv, deconv,
identity and max-pool, all at the encoder width. The UperNet head (pyramid pooling 1/2/3/6 + FPN
fusion) and an auxiliary FCN head on the third level produce logits at stride 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from crossmae.checkpoint import load_state_dict_strict, register_format
from crossmae.config import ConfigError
from crossmae.models.layers import (
    NORM_EPS,
    PatchEmbed,
    adapt_encoder_state,
    init_weights_,
    run_block,
    vit_layer_id,
)
from crossmae.models.pos_embed import sincos_2d
from crossmae.models.pretrained import encoder_widths

from .data import IGNORE

SEG_FORMAT = register_format(  # v2: mmseg's module names below the backbone
    "crossmae-seg-v2", "a UperNet segmenter trained by seg train or imported by seg import-mmseg"
)


class RelPosBiasAttention(nn.Module):
    """Self-attention over cls + an (H, W) grid with BEiT's learned relative position bias:
    a table of (2H-1)(2W-1) + 3 entries per head (the +3: token->cls, cls->token, cls->cls)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        H, W = grid
        n_rel = (2 * H - 1) * (2 * W - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel + 3, num_heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (HW, HW, 2)
        idx = (rel[..., 0] + H - 1) * (2 * W - 1) + (rel[..., 1] + W - 1)
        index = torch.zeros(H * W + 1, H * W + 1, dtype=torch.long)
        index[1:, 1:] = idx
        index[0, 1:], index[1:, 0], index[0, 0] = n_rel, n_rel + 1, n_rel + 2
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, h).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SegBlock(nn.Module):
    """Pre-norm block with relative position bias and layer scale (``gamma_1``, ``gamma_2``)."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path, grid, norm_eps, init_values=1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RelPosBiasAttention(dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values))
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def feature_blocks(depth: int) -> list[int]:
    """Blocks whose outputs feed the pyramid: ViT-B (12) -> 3, 5, 7, 11; ViT-L (24) -> 7, 11,
    15, 23 (MAE / BEiT); others scaled the same way."""
    idx = [depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1]
    if len(set(idx)) < 4:  # shallow models: evenly spaced (under 4 blocks, some repeat)
        idx = [max(round((i + 1) * depth / 4) - 1, 0) for i in range(4)]
    return idx


class SegViT(nn.Module):
    """The ViT backbone: (B, 3, S, S) -> four (B, D, S/p, S/p) maps.

    Args:
        img_size: training crop (512).
        patch_size, embed_dim, depth, num_heads, mlp_ratio, norm_eps: the encoder's.
        drop_path_rate: stochastic depth (0.1).
        out_indices: blocks whose outputs are returned (default: ``feature_blocks(depth)``).
    """

    def __init__(
        self,
        img_size=512,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        norm_eps=NORM_EPS,
        drop_path_rate=0.1,
        out_indices=None,
        **_ignored,
    ):
        super().__init__()
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.out_indices = list(out_indices) if out_indices is not None else feature_blocks(depth)
        if max(self.out_indices) >= depth:
            raise ConfigError(
                f"model.out_indices={self.out_indices} needs an encoder of at least "
                f"{max(self.out_indices) + 1} blocks; this one has {depth} (set "
                "model.out_indices to 4 of its blocks, or null for the default)"
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.grid))
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            SegBlock(embed_dim, num_heads, mlp_ratio, dpr[i], self.grid, norm_eps)
            for i in range(depth)
        )
        self.grad_checkpointing = False  # recompute block activations in backward (saves memory)
        init_weights_(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def load_pretrained(
        self, state_dict: dict[str, torch.Tensor], pretrain_grid: tuple[int, int]
    ) -> None:
        """Strict: the encoder's ``norm`` is dropped on purpose (features are taken without it),
        the position table is resampled to the crop's grid (and the patch kernel to this patch
        size), and only the relative position tables and layer scales may be missing."""
        sd = adapt_encoder_state(state_dict, patch_size=self.patch_size, grid=self.grid,
                                 pretrain_grid=pretrain_grid)  # fmt: skip
        new = {
            k for k in self.state_dict() if "relative_position_bias_table" in k or ".gamma_" in k
        }
        load_state_dict_strict(self, sd, allow_missing=new, what="pretrained encoder")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, L, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        H, W = self.grid
        outs = {}
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, x, self.grad_checkpointing)
            if i in self.out_indices:
                outs[i] = x[:, 1:].transpose(1, 2).reshape(B, -1, H, W)  # (B, D, H, W)
        return [outs[i] for i in self.out_indices]  # an encoder of < 4 blocks repeats some


class ConvModule(nn.Module):
    """Convolution (no bias) + BatchNorm + ReLU, named as mmcv's ``ConvModule`` (``conv``,
    ``bn``), with its initialisation: Kaiming-normal (fan-out, ReLU gain) weights, BN (1, 0).
    Distributed training turns the BN into SyncBatchNorm (``seg.train.sync_batchnorm``)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Feature2Pyramid(nn.Module):
    """mmseg's ``Feature2Pyramid``: four same-width maps to strides 4, 8, 16, 32 by
    deconv-BN-GELU-deconv, deconv, identity and max-pool."""

    def __init__(self, dim: int):
        super().__init__()
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2),
        )  # fmt: skip
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2))
        self.identity = nn.Identity()
        self.maxpool = nn.MaxPool2d(2, 2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.maxpool)
        return [op(f) for op, f in zip(ops, feats, strict=True)]


class UPerHead(nn.Module):
    """mmseg's ``UPerHead``: pyramid pooling on the coarsest level, FPN fusion top-down,
    3x3 convolutions, concatenation at stride 4, dropout and the 1x1 classifier ``conv_seg``.

    Args:
        dim: input width of every level.
        channels: head width.
        num_classes: output classes.
        pool_scales: pyramid pooling scales.
        dropout: before the classifier.
    """

    def __init__(self, dim: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):  # fmt: skip
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(dim, channels, 1))
            for s in pool_scales
        )
        self.bottleneck = ConvModule(dim + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = classifier(channels, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        pooled = [
            F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False)
            for p in self.psp_modules
        ]
        laterals = [lat(f) for lat, f in zip(self.lateral_convs, feats[:3], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:3], strict=True)]
        outs.append(laterals[3])
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg's ``FCNHead`` with one 3x3 ``ConvModule`` (the auxiliary head)."""

    def __init__(self, dim: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(dim, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


def classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """The 1x1 ``conv_seg`` of mmseg's decode heads, initialised N(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class UperNet(nn.Module):
    """ViT backbone + ``neck`` (Feature2Pyramid) + ``decode_head`` (UPerHead) +
    ``auxiliary_head`` (FCNHead on the stride-16 level): mmseg's ``EncoderDecoder`` for the MAE
    UperNet config, with mmseg's module names below the backbone.

    Args:
        backbone: a ``SegViT``.
        num_classes: output classes.
        channels: UperNet width (768 in the MAE / BEiT recipe).
        aux_channels: FCN head width (256).
        pool_scales: pyramid pooling scales.
        dropout: before the classifiers (0.1).
    """

    def __init__(
        self,
        backbone: SegViT,
        num_classes: int,
        channels: int = 768,
        aux_channels: int = 256,
        pool_scales=(1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        D = backbone.embed_dim
        self.neck = Feature2Pyramid(D)
        self.decode_head = UPerHead(D, channels, num_classes, tuple(pool_scales), dropout)
        self.auxiliary_head = FCNHead(D, aux_channels, num_classes, dropout)

    @property
    def num_layers(self) -> int:
        """Layers of layer-wise lr decay: the ViT's blocks (``layer_id``)."""
        return self.backbone.depth

    def layer_id(self, name: str) -> int:
        """mmseg's ``LayerDecayOptimizerConstructor``: the backbone's parameters by depth
        (embeddings 0, block i -> i + 1), everything else (neck, heads) ``num_layers + 1``."""
        if name.startswith("backbone."):
            return vit_layer_id(name.removeprefix("backbone."), self.num_layers)
        return self.num_layers + 1

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"logits": (B, C, H/4, W/4), "aux_logits": (B, C, H/16, W/16)}."""
        feats = self.neck(self.backbone(x))  # strides 4, 8, 16, 32
        return {"logits": self.decode_head(feats), "aux_logits": self.auxiliary_head(feats[2])}


def build_segmenter(cfg, num_classes: int, encoder_config: dict) -> UperNet:
    """The UperNet a ``SegConfig`` describes on an encoder of ``encoder_config``, untrained."""
    m = cfg.model
    patch = m.patch_size
    if cfg.data.crop % patch:
        raise ConfigError(f"data.crop={cfg.data.crop} is not a multiple of the patch size {patch}")
    backbone = SegViT(
        img_size=cfg.data.crop,
        patch_size=patch,
        **encoder_widths(encoder_config),
        drop_path_rate=m.drop_path_rate,
        out_indices=m.out_indices,
    )
    return UperNet(backbone, num_classes, channels=m.channels, aux_channels=m.aux_channels,
                   pool_scales=tuple(m.pool_scales))  # fmt: skip


def segmentation_losses(
    out: dict[str, torch.Tensor], labels: torch.Tensor, *, aux_weight: float,
    avg_non_ignore: bool = False,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """mmseg's ``loss_by_feat`` of both heads: logits bilinearly resized to the labels, cross
    entropy over the labelled pixels divided by all pixels (``avg_non_ignore=False``; true: by
    the labelled ones), the auxiliary head's times ``aux_weight``; ``acc_seg`` as mmseg's
    ``accuracy`` (percent of labelled pixels)."""
    losses = {}
    for key, name, weight in (("logits", "decode", 1.0), ("aux_logits", "aux", aux_weight)):
        logits = F.interpolate(out[key].float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)  # fmt: skip
        per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
        valid = labels != IGNORE
        denom = valid.sum().clamp(min=1) if avg_non_ignore else labels.numel()
        losses[f"{name}_loss_ce"] = weight * per_pixel.sum() / denom
        with torch.no_grad():
            eps = torch.finfo(torch.float32).eps
            correct = (logits.argmax(1) == labels)[valid].sum() + eps
            losses[f"{name}_acc_seg"] = correct * 100.0 / (valid.sum() + eps)
    return losses
