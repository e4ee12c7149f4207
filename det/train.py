"""ViTDet Mask R-CNN training on COCO-format data with detectron2's ViTDet recipe: AdamW (lr 1e-4,
betas 0.9 / 0.999, weight decay 0.1 on everything but the ViT's LayerNorms and position table),
layer-wise lr decay over the ViT, 250-iteration linear warmup from 0.1 %, x0.1 at each milestone,
fp16 autocast with gradient scaling, large-scale jitter; COCO box / mask AP at the end (and every
``eval_every``), in full precision.

    torchrun --nproc-per-node 8 -m det train --config configs/det/mask_rcnn_vit_base_100ep.yaml \
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/det_b ...
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from crossmae import distributed as du
from crossmae.checkpoint import model_on_encoder, seed_all
from crossmae.config import to_plain
from crossmae.data import ResumableSampler
from crossmae.optim import param_groups, step_lr_at
from crossmae.train import (
    PRECISIONS,
    append_record,
    plan_batches,
    resume_task_run,
    run_task_iterations,
    start_task_run,
)

from .data import CocoInstances, collate_detection
from .evaluate import evaluate_detector
from .model import ViTDetMaskRCNN, build_detector

log = logging.getLogger("crossmae")
DET_FORMAT = "crossmae-det-v2"  # v2: detectron2's module names and layouts


def pretrained_detector(cfg: DictConfig, num_classes: int) -> tuple[ViTDetMaskRCNN, dict]:
    """The detector on the configured encoder checkpoint (its weights in the ViT, unless
    ``encoder.random_init``); returns it and the encoder's settings."""
    return model_on_encoder(
        cfg.encoder, lambda enc: build_detector(cfg, num_classes, enc), lambda m: m.backbone.net
    )


def detectron2_param_groups(model: ViTDetMaskRCNN, cfg: DictConfig) -> list[dict]:
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
        return vit.layer_id(name.removeprefix(prefix)) if name.startswith(prefix) else vit.depth + 1

    return param_groups(model, cfg.weight_decay, layer_decay=cfg.layer_decay, layer_id=layer_id,
                        num_layers=vit.depth, weight_decay_of=decay_of)  # fmt: skip


def train_detector(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Train per ``cfg`` (a ``config.DetConfig``); returns the final COCO metrics."""
    if cfg.eval_precision not in PRECISIONS:
        raise ValueError(f"eval_precision must be one of {sorted(PRECISIONS)}")
    train_set = CocoInstances(cfg.train_json, cfg.train_images, train=True,
                              img_size=cfg.img_size, scale_range=cfg.scale_range)  # fmt: skip
    val_set = CocoInstances(cfg.val_json, cfg.val_images, train=False, img_size=cfg.img_size)
    device, out = start_task_run(cfg, resume)
    rank, world = du.rank(), du.world_size()

    torch.manual_seed(cfg.seed)
    model, encoder_config = pretrained_detector(cfg, train_set.num_classes)
    model.to(device)
    seed_all(cfg.seed + rank)  # this process's streams (drop path, augmentations)
    micro, accum = plan_batches(cfg.batch_size, world, cfg.micro_batch)
    sampler = ResumableSampler(
        len(train_set), per_rank_step=micro * accum, num_replicas=world, rank=rank, seed=cfg.seed
    )
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate_detection, generator=torch.Generator())  # fmt: skip
    opt = torch.optim.AdamW(detectron2_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")  # fmt: skip
    amp = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    ck = resume_task_run(out, resume, model, opt, scaler)
    step = ck["step"] if ck else 0
    ddp = model
    if world > 1:
        ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
        if cfg.ddp_fp16_compression:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

            ddp.register_comm_hook(None, fp16_compress_hook)
    log.info("ViTDet Mask R-CNN: %d classes, %d training images, batch %d (%d x %d x %d), "
             "%d iterations", train_set.num_classes, len(train_set), cfg.batch_size, world, micro,
             accum, cfg.iterations)  # fmt: skip

    def evaluate(step: int) -> dict:
        metrics = evaluate_detector(model, val_set, device, batch_size=cfg.eval_batch_size,
                                    precision=PRECISIONS[cfg.eval_precision],
                                    results_file=out / f"coco_results-{step}.json")  # fmt: skip
        append_record(
            metrics_file,
            {"step": step, **{f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}},
        )
        log.info("iteration %d: box AP %.2f, mask AP %.2f", step, metrics["bbox"]["AP"],
                 metrics["segm"]["AP"])  # fmt: skip
        return metrics

    def losses_of(batch) -> dict[str, torch.Tensor]:
        imgs, targets = batch
        imgs = [im.to(device, non_blocking=True) for im in imgs]
        targets = [t.to(device) for t in targets]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            losses = ddp(imgs, targets)
        return {**losses, "loss": sum(losses.values())}

    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    return run_task_iterations(
        out=out,
        iterations=cfg.iterations,
        step=step,
        sampler=sampler,
        loader=loader,
        accum=accum,
        model=model,
        ddp=ddp,
        optimizer=opt,
        scaler=scaler,
        device=device,
        lr_at=lambda s: step_lr_at(
            s,
            base_lr=cfg.lr,
            warmup_steps=cfg.warmup_iterations,
            milestones=list(cfg.lr_milestones),
            warmup_factor=cfg.warmup_factor,
        ),  # fmt: skip
        losses_of=losses_of,
        checkpoint_fields={
            "format": DET_FORMAT,
            "categories": train_set.cat_ids,
            "num_classes": train_set.num_classes,
            "encoder_config": encoder_config,
            "config": to_plain(cfg),
        },
        evaluate=evaluate,
        metrics_file=metrics_file,
        log_every=cfg.log_every,
        eval_every=cfg.eval_every,
        ckpt_every=cfg.ckpt_every,
    )
