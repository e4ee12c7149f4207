"""ViTDet Mask R-CNN (Li et al., arXiv:2203.16527) as detectron2's ``projects/ViTDet`` builds it
(``configs/common/models/mask_rcnn_vitdet.py``): our ViT backbone and simple feature pyramid, an
RPN and box / mask heads with detectron2's semantics, on torchvision's detection ops (NMS,
RoIAlign). Module names are detectron2's, so its state dicts load as they are (``det.d2``).

The pipeline around the network is detectron2's ``GeneralizedRCNN``:

- input: uint8 RGB images (3, h, w) already resized by the data pipeline; normalised with the
  pixel mean / std, then zero-padded (the mean colour) at the bottom / right to a square canvas
  of ``img_size`` (``ImageList.from_tensors`` with ViTDet's ``square_pad``);
- proposals and detections are clipped to each image's valid (unpadded) area;
- ``postprocess`` scales boxes to the original image and pastes the masks onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from crossmae.checkpoint import register_format
from crossmae.models.layers import vit_layer_id
from crossmae.models.pretrained import encoder_widths

from .backbone import PYRAMID_LEVELS, SimpleFeaturePyramid, ViTDetBackbone, pyramid_strides
from .roi_heads import ROIHeads
from .rpn import RPN
from .structures import Polygons, clip_boxes, nonempty, paste_masks_in_image

DET_FORMAT = register_format(  # v2: detectron2's module names and layouts
    "crossmae-det-v2", "a ViTDet Mask R-CNN trained by det train or imported by det import-d2"
)
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class HeadConfig:
    """Widths of the pyramid and heads (ViTDet's defaults); small values make test models."""

    pyramid_channels: int = 256
    box_conv_dims: list[int] = field(default_factory=lambda: [256] * 4)
    box_fc_dims: list[int] = field(default_factory=lambda: [1024])
    mask_conv_dims: list[int] = field(default_factory=lambda: [256] * 4)
    mask_deconv_dim: int = 256


@dataclass
class Targets:
    """One training image's ground truth in input coordinates: float32 XYXY ``boxes`` (G, 4),
    0-based ``classes`` (G,), and each instance's ``polygons``."""

    boxes: torch.Tensor
    classes: torch.Tensor
    polygons: list[Polygons]

    def to(self, device: torch.device) -> Targets:
        """Boxes and classes on ``device`` (polygons stay numpy: the mask targets are rasterised
        on the CPU, as detectron2 does)."""
        return Targets(self.boxes.to(device), self.classes.to(device), self.polygons)


class ViTDetMaskRCNN(nn.Module):
    """Mask R-CNN on a ViTDet backbone.

    Args:
        backbone: the ViT.
        num_classes: K, without background.
        heads: pyramid / head widths.
        img_size: the square canvas inputs are padded to (1024).
        roi_batch_size: RoIs sampled per training image (512).
    """

    def __init__(self, backbone: ViTDetBackbone, num_classes: int, heads: HeadConfig,
                 img_size: int = 1024, roi_batch_size: int = 512):  # fmt: skip
        super().__init__()
        strides = pyramid_strides()
        self.img_size = img_size
        self.num_classes = num_classes
        self.backbone = SimpleFeaturePyramid(backbone, heads.pyramid_channels)
        self.proposal_generator = RPN(
            heads.pyramid_channels,
            [strides[name] for name in PYRAMID_LEVELS],
            anchor_sizes=[8 * strides[name] for name in PYRAMID_LEVELS],  # 32 ... 512
        )
        self.roi_heads = ROIHeads(
            heads.pyramid_channels,
            [strides[name] for name in PYRAMID_LEVELS[:4]],
            num_classes,
            box_conv_dims=heads.box_conv_dims,
            box_fc_dims=heads.box_fc_dims,
            mask_conv_dims=heads.mask_conv_dims,
            mask_deconv_dim=heads.mask_deconv_dim,
            batch_size_per_image=roi_batch_size,
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    @property
    def num_layers(self) -> int:
        """Layers of layer-wise lr decay: the ViT's blocks (``layer_id``)."""
        return self.backbone.net.depth

    def layer_id(self, name: str) -> int:
        """detectron2's ``get_vit_lr_decay_rate``: the ViT's parameters by depth (embeddings 0,
        block i -> i + 1), everything else (pyramid, heads) ``num_layers + 1``."""
        prefix = "backbone.net."
        if name.startswith(prefix):
            return vit_layer_id(name.removeprefix(prefix), self.num_layers)
        return self.num_layers + 1

    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, h, w) images -> the normalised batch (B, 3, S, S), zero-padded."""
        S = self.img_size
        batch = self.pixel_mean.new_zeros(len(images), 3, S, S)
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            if h > S or w > S:
                raise ValueError(f"an input image of {h}x{w} does not fit the {S}x{S} canvas")
            batch[i, :, :h, :w] = (im.to(batch.dtype) - self.pixel_mean) / self.pixel_std
        return batch

    def forward(self, images: list[torch.Tensor], targets: list[Targets] | None = None):
        """Training (with ``targets``): the dict of the five losses. Evaluation: detections per
        image in input coordinates (see ``ROIHeads.inference``)."""
        sizes = [tuple(im.shape[-2:]) for im in images]
        feats = self.backbone(self.preprocess(images))
        feats = [feats[name] for name in PYRAMID_LEVELS]
        if targets is not None:
            proposals, losses = self.proposal_generator(feats, sizes, [t.boxes for t in targets])
            losses |= self.roi_heads.losses(
                feats[:4], [p[0] for p in proposals], [t.boxes for t in targets],
                [t.classes for t in targets], [t.polygons for t in targets],
            )  # fmt: skip
            return losses
        proposals, _ = self.proposal_generator(feats, sizes)
        return self.roi_heads.inference(feats[:4], [p[0] for p in proposals], sizes)


def postprocess(
    result: dict[str, torch.Tensor], size: tuple[int, int], orig_size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """detectron2's ``detector_postprocess``: detections on an input of ``size`` -> boxes scaled to
    the original image of ``orig_size`` (H0, W0) and clipped, empty ones dropped, masks pasted
    onto it (bool (N, H0, W0), threshold 0.5)."""
    (h, w), (H0, W0) = size, orig_size
    boxes = result["boxes"].clone()
    boxes[:, 0::2] *= W0 / w
    boxes[:, 1::2] *= H0 / h
    boxes = clip_boxes(boxes, (H0, W0))
    keep = nonempty(boxes)
    out = {"boxes": boxes[keep], "scores": result["scores"][keep],
           "classes": result["classes"][keep]}  # fmt: skip
    if "mask_probs" in result:
        out["masks"] = paste_masks_in_image(result["mask_probs"][keep], out["boxes"], (H0, W0))
    return out


def build_detector(cfg, num_classes: int, encoder_config: dict) -> ViTDetMaskRCNN:
    """The detector a ``DetConfig.model`` section describes on an encoder of ``encoder_config`` (its
    constructor settings: widths, depth, patch size, pretraining img_size), untrained."""
    patch = cfg.patch_size
    if cfg.img_size % patch:
        raise ValueError(
            f"model.img_size={cfg.img_size} is not a multiple of the patch size {patch}"
        )
    pretrain_size = cfg.pretrain_img_size or encoder_config["img_size"]
    if pretrain_size % patch:  # the position table is resampled from the pretraining grid
        source = (
            "model.pretrain_img_size"
            if cfg.pretrain_img_size
            else f"the encoder's img_size (its patch size {encoder_config.get('patch_size')})"
        )
        raise ValueError(
            f"the pretraining image size {pretrain_size} ({source}) is not a multiple of the "
            f"detector's patch size {patch} (model.patch_size): set model.pretrain_img_size to "
            f"a multiple of {patch} near {pretrain_size}, e.g. "
            f"{max(patch, round(pretrain_size / patch) * patch)}, or model.patch_size to the "
            "encoder's"
        )
    backbone = ViTDetBackbone(
        img_size=cfg.img_size,
        pretrain_img_size=pretrain_size,
        patch_size=patch,
        **encoder_widths(encoder_config),
        drop_path_rate=cfg.drop_path_rate,
        window=cfg.window,
        global_blocks=cfg.global_blocks,
        explicit_attention=cfg.attention == "explicit",
    )
    heads = HeadConfig(**dict(cfg.heads))
    return ViTDetMaskRCNN(
        backbone, num_classes, heads, img_size=cfg.img_size, roi_batch_size=cfg.roi_batch_size
    )
