"""Reproducing a detectron2 parity file (``detectron2-vitdet-mask-rcnn-parity-v1``: what
detectron2's ViTDet Mask R-CNN computed at every stage on a few images, with its own state dict;
see the parity tests): build our detector from the file's ``config``,
run the evaluation stages on its images, and replay its training forward with the anchors and
RoIs detectron2 sampled."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .backbone import PYRAMID_LEVELS, ViTDetBackbone
from .model import HeadConfig, Targets, ViTDetMaskRCNN

FORMAT = "detectron2-vitdet-mask-rcnn-parity-v1"


def load_fixture(path) -> dict[str, Any]:
    fx = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(fx, dict) or fx.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    return fx


def model_from_config(config: dict, dtype: torch.dtype = torch.float64) -> ViTDetMaskRCNN:
    """Our detector as a parity file's ``config`` describes detectron2's (untrained)."""
    vit, rh, fpn = config["vit"], config["roi_heads"], config["simple_feature_pyramid"]
    if not (vit["pretrain_use_cls_token"] and vit["use_rel_pos"] and vit["use_abs_pos"]):
        raise ValueError("the ViT must use a cls slot, relative and absolute positions (ViTDet)")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        backbone = ViTDetBackbone(
            img_size=vit["img_size"], pretrain_img_size=vit["pretrain_img_size"],
            patch_size=vit["patch_size"], embed_dim=vit["embed_dim"], depth=vit["depth"],
            num_heads=vit["num_heads"], mlp_ratio=vit["mlp_ratio"],
            norm_eps=vit["layernorm_eps"], drop_path_rate=vit["drop_path_rate"],
            window=vit["window_size"], global_blocks=vit["global_block_indexes"],
        )  # fmt: skip
        heads = HeadConfig(
            pyramid_channels=fpn["out_channels"],
            box_conv_dims=rh["box_head"]["conv_dims"], box_fc_dims=rh["box_head"]["fc_dims"],
            mask_conv_dims=rh["mask_head"]["conv_dims"],
            mask_deconv_dim=rh["mask_head"]["deconv_dim"],
        )  # fmt: skip
        model = ViTDetMaskRCNN(
            backbone,
            rh["num_classes"],
            heads,
            img_size=fpn["square_pad"],
            roi_batch_size=rh["batch_size_per_image"],
        )
    finally:
        torch.set_default_dtype(old)
    for name in ("pixel_mean", "pixel_std"):  # buffers, not in detectron2's state dict
        buf = getattr(model, name)
        buf.copy_(torch.tensor(config[name], dtype=buf.dtype).view(-1, 1, 1))
    return model


@torch.no_grad()
def evaluation_stages(model: ViTDetMaskRCNN, fx: dict) -> dict[str, Any]:
    """Every stage of one evaluation forward over the file's images, as one batch."""
    model.eval()
    images = [c["image"] for c in fx["cases"]]
    sizes = [tuple(c["image_size"]) for c in fx["cases"]]
    x = model.preprocess(images)
    pyramid = model.backbone(x)
    feats = [pyramid[k] for k in PYRAMID_LEVELS]
    rpn = model.proposal_generator
    logits, deltas = rpn.rpn_head(feats)
    proposals, _ = rpn(feats, sizes)
    dets = model.roi_heads.inference(feats[:4], [p[0] for p in proposals], sizes)
    return {"input": x, "backbone": model.backbone.net(x), "pyramid": pyramid,
            "anchors": rpn.anchor_generator(feats), "logits": logits, "deltas": deltas,
            "proposals": proposals, "detections": dets, "sizes": sizes}  # fmt: skip


def training_targets(fx: dict) -> list[Targets]:
    return [
        Targets(boxes=t["gt_boxes"], classes=t["gt_classes"],
                polygons=[[np.asarray(p, dtype=np.float64) for p in inst]
                          for inst in t["gt_polygons"]])
        for t in (c["train"] for c in fx["cases"])
    ]  # fmt: skip


@torch.no_grad()
def replay_training(model: ViTDetMaskRCNN, fx: dict) -> dict[str, Any]:
    """The training forward on the file's batch, with the anchors and RoIs detectron2 sampled
    replayed. Returns the ``losses``, the labels each sampler call was given (``sampler_labels``:
    RPN per image, then RoI heads per image), the training ``proposals`` and the foreground RoIs
    the mask head read (``mask_boxes``)."""
    cases = [c["train"] for c in fx["cases"]]
    draws = [(t["rpn_sampled_pos"], t["rpn_sampled_neg"]) for t in cases]
    draws += [(t["roi_sampled_fg"], t["roi_sampled_bg"]) for t in cases]
    seen, recorded = [], {}
    rpn, heads = model.proposal_generator, model.roi_heads
    samplers, roi_losses, mask_pool = (rpn.sampler, heads.sampler), heads.losses, heads.mask_pooler
    pool = mask_pool.forward

    def replay(labels, num, fraction, bg):
        seen.append(labels.clone())
        return draws[len(seen) - 1]

    def keep_proposals(features, proposals, *rest):
        recorded["proposals"] = proposals
        return roi_losses(features, proposals, *rest)

    def keep_mask_boxes(features, boxes):
        recorded["mask_boxes"] = boxes
        return pool(features, boxes)

    rpn.sampler = heads.sampler = replay
    heads.losses, mask_pool.forward = keep_proposals, keep_mask_boxes
    try:
        model.train()
        losses = model([c["image"] for c in fx["cases"]], training_targets(fx))
    finally:
        del heads.losses, mask_pool.forward  # the methods again
        rpn.sampler, heads.sampler = samplers
        model.eval()
    return {"losses": losses, "sampler_labels": seen, **recorded}
