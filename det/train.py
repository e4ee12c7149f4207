"""ViTDet Mask R-CNN training on COCO-format data (ViTDet recipe: AdamW lr 1e-4, wd 0.1,
layer-wise lr decay over the backbone, 250-iteration linear warmup, x0.1 at 88.9 % and 96.3 % of
training, bf16, large-scale jitter), COCO box / mask AP at the end (and every ``eval_every``).

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
from crossmae.checkpoint import (
    load_pretrained_encoder,
)
from crossmae.config import to_plain
from crossmae.data import ResumableSampler
from crossmae.models.vit import grid_of
from crossmae.optim import param_groups, step_lr_at
from crossmae.train import (
    PRECISIONS,
    append_record,
    plan_batches,
    resume_task_run,
    run_task_iterations,
    start_task_run,
)

from .backbone import ViTDetBackbone
from .data import CocoInstances, collate_detection
from .evaluate import evaluate_detector
from .model import vitdet_mask_rcnn

log = logging.getLogger("crossmae")
DET_FORMAT = "crossmae-det-v1"


def build_detector(
    cfg: DictConfig, num_classes: int, encoder_config: dict | None = None
) -> tuple[nn.Module, dict]:
    """Mask R-CNN on a ViTDet backbone; initialised from the configured encoder checkpoint unless
    ``encoder_config`` is given (rebuilding a trained detector, whose weights load afterwards).
    Returns the model and the encoder settings it was built from."""
    sd = None
    if encoder_config is None:
        sd, encoder_config = load_pretrained_encoder(
            cfg.encoder.checkpoint, official_arch=cfg.encoder.official_arch
        )
    backbone = ViTDetBackbone(
        **{**encoder_config, "img_size": cfg.img_size, "window": cfg.window,
           "drop_path_rate": cfg.drop_path_rate,
           "patch_size": cfg.patch_size or encoder_config["patch_size"]}
    )  # fmt: skip
    if sd is not None and not cfg.encoder.random_init:
        pretrain_grid = grid_of(encoder_config["img_size"], encoder_config["patch_size"])
        backbone.load_pretrained(sd, pretrain_grid)
    return vitdet_mask_rcnn(backbone, num_classes, img_size=cfg.img_size), encoder_config


def layer_id_of(model: nn.Module):
    """Depth for layer decay: the ViT's own depths; everything else (pyramid, heads) on top."""
    vit = model.backbone.backbone
    prefix = "backbone.backbone."

    def layer_id(name: str) -> int:
        return vit.layer_id(name.removeprefix(prefix)) if name.startswith(prefix) else vit.depth + 1

    return layer_id


def train_detector(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Train per ``cfg`` (a ``config.DetConfig``); returns the final COCO metrics."""
    train_set = CocoInstances(cfg.train_json, cfg.train_images, train=True, img_size=cfg.img_size)
    val_set = CocoInstances(cfg.val_json, cfg.val_images, train=False, img_size=cfg.img_size)
    device, out = start_task_run(cfg, resume)
    rank, world = du.rank(), du.world_size()

    torch.manual_seed(cfg.seed)
    model, encoder_config = build_detector(cfg, train_set.num_classes)
    model.to(device)
    torch.manual_seed(cfg.seed + rank)
    micro, accum = plan_batches(cfg.batch_size, world, cfg.micro_batch)
    sampler = ResumableSampler(
        len(train_set), per_rank_step=micro * accum, num_replicas=world, rank=rank, seed=cfg.seed
    )
    loader = DataLoader(
        train_set,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_detection,
        generator=torch.Generator(),
    )
    groups = param_groups(
        model,
        cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        layer_id=layer_id_of(model),
        num_layers=model.backbone.backbone.depth,
        no_decay_names={"backbone.backbone.pos_embed"},
    )
    opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    amp = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    milestones = [round(f * cfg.iterations) for f in cfg.decay_at]

    ck = resume_task_run(out, resume, model, opt, scaler)
    step = ck["step"] if ck else 0
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    log.info(
        "ViTDet Mask R-CNN: %d classes, %d training images, batch %d (%d x %d x %d), %d iterations",
        train_set.num_classes,
        len(train_set),
        cfg.batch_size,
        world,
        micro,
        accum,
        cfg.iterations,
    )

    def evaluate(step: int) -> dict:
        metrics = evaluate_detector(
            model,
            val_set,
            device,
            batch_size=cfg.eval_batch_size,
            results_file=out / f"coco_results-{step}.json",
        )
        append_record(
            metrics_file,
            {"step": step, **{f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}},
        )
        log.info(
            "iteration %d: box AP %.2f, mask AP %.2f",
            step,
            metrics["bbox"]["AP"],
            metrics["segm"]["AP"],
        )
        return metrics

    def losses_of(batch) -> dict[str, torch.Tensor]:
        imgs, targets = batch
        imgs = [im.to(device, non_blocking=True) for im in imgs]
        targets = [{k: t[k].to(device) for k in ("boxes", "labels", "masks")} for t in targets]
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
            s, base_lr=cfg.lr, warmup_steps=cfg.warmup_iterations, milestones=milestones
        ),
        losses_of=losses_of,
        checkpoint_fields={
            "format": DET_FORMAT,
            "categories": train_set.cat_ids,
            "encoder_config": encoder_config,
            "config": to_plain(cfg),
        },
        evaluate=evaluate,
        metrics_file=metrics_file,
        log_every=cfg.log_every,
        eval_every=cfg.eval_every,
        ckpt_every=cfg.ckpt_every,
    )
