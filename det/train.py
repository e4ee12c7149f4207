"""ViTDet Mask R-CNN training on COCO-format data with detectron2's ViTDet recipe: AdamW (lr 1e-4,
betas 0.9 / 0.999, weight decay 0.1 on everything but the ViT's LayerNorms and position table),
layer-wise lr decay over the ViT, 250-iteration linear warmup from 0.1 %, x0.1 at each milestone,
fp16 autocast with gradient scaling, large-scale jitter; COCO box / mask AP at the end (and every
``eval.every_steps``), in full precision.

    torchrun --nproc-per-node 8 -m crossmae det train \
        --config configs/det/mask_rcnn_vit_base_100ep.yaml data.train_json=... \
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/det_b
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from crossmae import distributed as du
from crossmae.checkpoint import seed_all
from crossmae.config import to_plain
from crossmae.engine import (
    PRECISIONS,
    Hooks,
    check_precision,
    finish_task,
    open_run,
    task_engine,
    task_loader,
)
from crossmae.models.layers import vit_layer_id
from crossmae.models.pretrained import model_on_encoder
from crossmae.optim import param_groups, step_lr_at

from .data import CocoInstances, collate_detection
from .evaluate import evaluate_detector
from .model import ViTDetMaskRCNN, build_detector

log = logging.getLogger("crossmae")
DET_FORMAT = "crossmae-det-v2"  # v2: detectron2's module names and layouts


def pretrained_detector(cfg: DictConfig, num_classes: int) -> tuple[ViTDetMaskRCNN, dict]:
    """The detector on the configured encoder checkpoint (its weights in the ViT, unless
    ``encoder.random_init``); returns it and the encoder's settings."""
    return model_on_encoder(cfg.encoder, lambda enc: build_detector(cfg.model, num_classes, enc),
                            lambda m: m.backbone.net)  # fmt: skip


def detectron2_param_groups(model: ViTDetMaskRCNN, cfg: DictConfig) -> list[dict]:
    # cfg: the ``optim`` section
    """detectron2's ``get_default_optimizer_params`` as ViTDet sets it: ``weight_decay``
    everywhere (biases and the pyramid's and heads' LayerNorms included) except the ViT's
    ``nn.LayerNorm`` parameters (``weight_decay_norm``) and ``pos_embed``
    (``pos_embed_weight_decay``), None = no exception; lr scaled by ``get_vit_lr_decay_rate``."""
    norm_params = {
        f"{mn}.{pn}"
        for mn, m in model.named_modules()
        if isinstance(m, nn.LayerNorm)
        for pn, _ in m.named_parameters(recurse=False)
    }
    vit = model.backbone.net

    def decay_of(name: str) -> float:
        if name.endswith("pos_embed") and cfg.pos_embed_weight_decay is not None:
            return cfg.pos_embed_weight_decay
        if name in norm_params and cfg.weight_decay_norm is not None:
            return cfg.weight_decay_norm
        return cfg.weight_decay

    def layer_id(name: str) -> int:
        prefix = "backbone.net."
        inside = name.startswith(prefix)
        return vit_layer_id(name.removeprefix(prefix), vit.depth) if inside else vit.depth + 1

    return param_groups(model, cfg.weight_decay, layer_decay=cfg.layer_decay, layer_id=layer_id,
                        num_layers=vit.depth, weight_decay_of=decay_of)  # fmt: skip


def train_detector(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Train per ``cfg`` (a ``config.DetConfig``); returns the final COCO metrics."""
    check_precision(cfg.eval.precision, "eval.precision")
    d = cfg.data
    train_set = CocoInstances(d.train_json, d.train_images, train=True,
                              img_size=cfg.model.img_size, scale_range=d.scale_range)  # fmt: skip
    val_set = CocoInstances(d.val_json, d.val_images, train=False, img_size=cfg.model.img_size)
    device = open_run(cfg, resume, cfg.output_dir)
    out = Path(cfg.output_dir)

    torch.manual_seed(cfg.train.seed)
    model, encoder_config = pretrained_detector(cfg, train_set.num_classes)
    model.to(device)
    seed_all(cfg.train.seed + du.rank())  # this process's streams (drop path, augmentations)
    sampler, loader, accum = task_loader(train_set, cfg, device, collate_detection)
    opt = torch.optim.AdamW(detectron2_param_groups(model, cfg.optim), lr=cfg.optim.lr,
                            betas=(0.9, 0.999), fused=device.type == "cuda")  # fmt: skip

    def evaluate(step: int) -> dict:
        metrics = evaluate_detector(model, val_set, device, batch_size=cfg.eval.batch_size,
                                    precision=PRECISIONS[cfg.eval.precision],
                                    results_file=out / f"coco_results-{step}.json")  # fmt: skip
        engine.record({"step": step, **{f"{t}/{k}": v for t, m in metrics.items()
                                        for k, v in m.items()}}, "eval")  # fmt: skip
        log.info("step %d: box AP %.2f, mask AP %.2f", step, metrics["bbox"]["AP"],
                 metrics["segm"]["AP"])  # fmt: skip
        return metrics

    def inputs(batch) -> dict:
        imgs, targets = batch
        return {"imgs": [im.to(device, non_blocking=True) for im in imgs],
                "targets": [t.to(device) for t in targets]}  # fmt: skip

    def losses(forward, imgs, targets) -> dict[str, torch.Tensor]:
        parts = forward(imgs, targets)
        return {**parts, "loss": sum(parts.values())}

    fields = {"format": DET_FORMAT, "categories": train_set.cat_ids,
              "num_classes": train_set.num_classes, "encoder_config": encoder_config,
              "config": to_plain(cfg)}  # fmt: skip
    o = cfg.optim
    engine = task_engine(
        cfg, model, opt, out=out, device=device, sampler=sampler, loader=loader, accum=accum,
        steps=cfg.train.steps, inputs=inputs, losses=losses,
        lr_at=lambda s: step_lr_at(s, base_lr=o.lr, warmup_steps=o.warmup_steps,
                                   milestones=list(o.lr_milestones), warmup_factor=o.warmup_factor),
        hooks=Hooks(evaluate=evaluate, checkpoint_fields=lambda: fields),
        eval_every=cfg.eval.every_steps, ddp_fp16_compression=cfg.train.ddp_fp16_compression,
    )  # fmt: skip
    engine.resume(resume)
    log.info("ViTDet Mask R-CNN: %d classes, %d training images, batch %d (%d processes x %d "
             "accumulation), %d steps", train_set.num_classes, len(train_set),
             cfg.train.batch_size, du.world_size(), accum, cfg.train.steps)  # fmt: skip
    return finish_task(engine, out)
