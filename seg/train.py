"""UperNet training for semantic segmentation (MAE / BEiT recipe: AdamW lr 1e-4, wd 0.05,
layer-wise lr decay 0.65, 1500-iteration linear warmup then poly decay, batch 16, 512 crops,
auxiliary FCN loss x 0.4, bf16), mIoU by sliding-window inference, ``--resume auto``.

    torchrun --nproc-per-node 8 -m seg train \
        --config configs/seg/upernet_vit_base_ade20k_160k.yaml root=/data/ADEChallengeData2016 \
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt output_dir=runs/seg_b
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from crossmae import distributed as du
from crossmae.checkpoint import (
    load_pretrained_encoder,
)
from crossmae.config import ConfigError, to_plain
from crossmae.data import ResumableSampler, normalize_pixels
from crossmae.models.vit import grid_of
from crossmae.optim import param_groups, poly_lr_at
from crossmae.train import (
    PRECISIONS,
    append_record,
    plan_batches,
    resume_task_run,
    run_task_iterations,
    start_task_run,
)

from .data import ADE20K, CAMVID, IGNORE, LabelSpec, SegAugment, SegFolder
from .metrics import SegMetrics, format_table
from .model import SegViT, UperNet, slide_inference

log = logging.getLogger("crossmae")
SEG_FORMAT = "crossmae-seg-v1"


def label_spec(cfg: DictConfig) -> LabelSpec:
    if cfg.dataset == "ade20k":
        return ADE20K
    if cfg.dataset == "camvid":
        return CAMVID
    if cfg.dataset == "custom":
        return LabelSpec(cfg.num_classes, cfg.ignore_value, cfg.reduce_zero_label)
    raise ConfigError(f"dataset must be ade20k, camvid or custom, got {cfg.dataset!r}")


def build_segmenter(cfg: DictConfig, num_classes: int, encoder_config: dict | None = None):
    """UperNet on our encoder (loaded from the configured checkpoint unless ``encoder_config``
    is given, for rebuilding a trained model); returns the model and the encoder settings."""
    sd = None
    if encoder_config is None:
        sd, encoder_config = load_pretrained_encoder(
            cfg.encoder.checkpoint, official_arch=cfg.encoder.official_arch
        )
    backbone = SegViT(**{
        **encoder_config, "img_size": cfg.crop, "drop_path_rate": cfg.drop_path_rate,
        "patch_size": cfg.patch_size or encoder_config["patch_size"],
    })  # fmt: skip
    if sd is not None and not cfg.encoder.random_init:
        backbone.load_pretrained(
            sd, grid_of(encoder_config["img_size"], encoder_config["patch_size"])
        )
    return UperNet(backbone, num_classes, channels=cfg.channels), encoder_config


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    folder: SegFolder,
    num_classes: int,
    device,
    crop: int,
    stride: int,
    scale=None,
    ratios=(1.0,),
    flip: bool = False,
    mode: str = "slide",
) -> dict:
    """mIoU / mAcc / aAcc over ``folder``: each image rescaled to the training ``scale`` times
    each of ``ratios`` (keeping its aspect, as mmseg's test pipeline; several ratios and ``flip``
    = multi-scale + flip testing, softmax scores averaged), slide inference, scores resized back
    to the label; each process takes its own shard and the confusion matrices are summed, so
    every image counts once. ``mode="whole"`` instead resizes each (rescaled) image to one
    crop x crop input (the backbone's position tables are made for that grid)."""
    if mode not in ("slide", "whole"):
        raise ConfigError(f"eval_mode must be 'slide' or 'whole', got {mode!r}")
    model.eval()
    metrics = SegMetrics(num_classes, IGNORE)
    for i in du.shard(len(folder), du.rank(), du.world_size()):
        img, label, _ = folder[i]
        image = normalize_pixels(img)[None].to(device)  # uint8 (3, H, W): no resize, slide windows
        H, W = label.shape
        base = min(max(scale) / max(H, W), min(scale) / min(H, W)) if scale is not None else 1.0
        scores = torch.zeros(1, num_classes, H, W, device=device)
        for r in ratios:
            size = (round(H * base * r), round(W * base * r))
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                xi = x.flip(-1) if flipped else x
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
                ):
                    if mode == "slide":
                        logits = slide_inference(model, xi, num_classes, crop=crop, stride=stride)
                    else:
                        xw = F.interpolate(
                            xi, size=(crop, crop), mode="bilinear", align_corners=False
                        )
                        logits = model(xw)["logits"]
                logits = logits.flip(-1) if flipped else logits
                logits = F.interpolate(
                    logits.float(), size=(H, W), mode="bilinear", align_corners=False
                )
                scores += logits.softmax(dim=1)
        metrics.update(scores.argmax(1)[0].cpu(), label)
    metrics.all_reduce()
    model.train()
    return metrics.compute()


def train_segmenter(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Train per ``cfg`` (a ``config.SegConfig``); returns the final metrics."""
    spec = label_spec(cfg)
    train_folder = SegFolder(cfg.root, cfg.train_split, spec)
    val_folder = SegFolder(cfg.root, cfg.val_split, spec)
    device, out = start_task_run(cfg, resume)
    rank, world = du.rank(), du.world_size()

    torch.manual_seed(cfg.seed)
    model, encoder_config = build_segmenter(cfg, spec.num_classes)
    model.to(device)
    torch.manual_seed(cfg.seed + rank)
    data = SegAugment(
        train_folder, cfg.crop, tuple(cfg.scale), tuple(cfg.ratio_range), cfg.cat_max_ratio
    )
    micro, accum = plan_batches(cfg.batch_size, world, cfg.micro_batch)
    sampler = ResumableSampler(
        len(data), per_rank_step=micro * accum, num_replicas=world, rank=rank, seed=cfg.seed
    )
    loader = DataLoader(
        data,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    vit = model.backbone
    prefix = "backbone."
    groups = param_groups(
        model,
        cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        num_layers=vit.depth,
        layer_id=lambda n: (
            vit.layer_id(n.removeprefix(prefix)) if n.startswith(prefix) else vit.depth + 1
        ),
        no_decay_names={"backbone.pos_embed", "backbone.cls_token"},
    )
    opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    amp = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    ck = resume_task_run(out, resume, model, opt, scaler)
    step = ck["step"] if ck else 0
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    log.info(
        "UperNet: %d classes, %d training images, batch %d (%d x %d x %d), %d iterations",
        spec.num_classes,
        len(train_folder),
        cfg.batch_size,
        world,
        micro,
        accum,
        cfg.iterations,
    )

    def evaluate(step: int) -> dict:
        m = evaluate_segmenter(
            model,
            val_folder,
            spec.num_classes,
            device,
            cfg.crop,
            cfg.eval_stride,
            tuple(cfg.scale),
            tuple(cfg.eval_ratios),
            cfg.eval_flip,
            cfg.eval_mode,
        )
        append_record(
            metrics_file, {"step": step, "mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"]}
        )
        log.info(
            "iteration %d: mIoU %.2f mAcc %.2f aAcc %.2f", step, m["mIoU"], m["mAcc"], m["aAcc"]
        )
        return m

    def losses_of(batch) -> dict[str, torch.Tensor]:
        imgs, labels = batch
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out_ = ddp(imgs)
        size = labels.shape[-2:]  # logits upsampled to the labels, losses in fp32
        main, aux = (
            F.interpolate(out_[k].float(), size=size, mode="bilinear", align_corners=False)
            for k in ("logits", "aux_logits")
        )
        loss = F.cross_entropy(main, labels, ignore_index=IGNORE)
        return {"loss": loss + cfg.aux_weight * F.cross_entropy(aux, labels, ignore_index=IGNORE)}

    def finish(metrics: dict) -> None:
        (out / "per_class.md").write_text(format_table(metrics, spec.names()) + "\n")

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
        lr_at=lambda s: poly_lr_at(
            s, base_lr=cfg.lr, total_steps=cfg.iterations, warmup_steps=cfg.warmup_iterations
        ),
        losses_of=losses_of,
        checkpoint_fields={
            "format": SEG_FORMAT,
            "encoder_config": encoder_config,
            "num_classes": spec.num_classes,
            "config": to_plain(cfg),
        },
        evaluate=evaluate,
        metrics_file=metrics_file,
        log_every=cfg.log_every,
        eval_every=cfg.eval_every,
        ckpt_every=cfg.ckpt_every,
        finish=finish,
    )
