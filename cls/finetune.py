"""Supervised training on a pretrained encoder, one loop for both recipes:

- finetuning (MAE / CrossMAE recipe: AdamW, layer-wise lr decay, warmup + cosine, drop path,
  RandAugment, mixup / cutmix, random erasing, label smoothing, average pooling + fc_norm,
  optional EMA, bf16);
- the linear probe (``probe=True``, ``config.LinprobeConfig``: frozen encoder, cls token,
  BatchNorm + Linear head, LARS, RandomResizedCrop + flip).

Accuracy on the val split every epoch with exact distributed counting, best and last
checkpoints, ``--resume auto``.

    torchrun --nproc-per-node 8 -m cls finetune --config configs/cls/finetune_vit_base.yaml \
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt train=... val=... output_dir=...
"""

from __future__ import annotations

import contextlib
import json
import logging

import timm.data.auto_augment as timm_auto_augment
import torch
import torchvision.transforms as T
from omegaconf import DictConfig
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from crossmae import distributed as du
from crossmae.checkpoint import (
    LAST,
    load_pretrained_encoder,
    random_states,
    save_atomic,
    seed_all,
    write_text_atomic,
)
from crossmae.config import ConfigError, to_plain
from crossmae.data import Labelled, ResumableSampler, classify_eval_transform
from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SingleDrawRandomResizedCrop
from crossmae.models import VisionTransformer
from crossmae.optim import LARS, lr_at, param_groups
from crossmae.train import (
    PRECISIONS,
    StopRequest,
    append_record,
    plan_batches,
    resume_task_run,
    start_task_run,
)

from .data import class_folders
from .encoder import build_classifier
from .features import ProbeHead

log = logging.getLogger("crossmae")
FINETUNE_FORMAT = "crossmae-finetune-v1"
MAX_NONFINITE = 5  # consecutive non-finite losses before the run stops


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the meaning Pillow used to give 0 bits (a black image). RandAugment's
    increasing posterize reaches 0 bits at magnitude 10 (m9 plus magnitude noise), which Pillow
    13 rejects ("bits must be between or equal to 1 and 8") and which would crash a finetune."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    timm_auto_augment.NAME_TO_OP[_name] = _posterize


class _Keyed(Dataset):
    """``ResumableSampler`` yields (index, seed); timm's transforms draw from the worker RNG."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        return self.ds[key[0]][:2]


@torch.no_grad()
def evaluate(
    model: nn.Module, source, img_size: int, device, batch_size: int = 128, workers: int = 2
) -> dict:
    """Top-1 / top-5 on ``source``: each process takes its own shard (no padding) and the
    correct counts are summed, so every image is counted exactly once."""
    model.eval()
    ds = torch.utils.data.Subset(
        Labelled(source, classify_eval_transform(img_size)),
        du.shard(len(source), du.rank(), du.world_size()),
    )
    counts = torch.zeros(3, device=device)  # top1 hits, top5 hits, images
    for imgs, y, _ in DataLoader(ds, batch_size=batch_size, num_workers=workers):
        imgs, y = imgs.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(imgs)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y.unsqueeze(1)
        counts += torch.stack(
            [hit[:, :1].any(1).sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)]
        )
    if du.is_dist():
        torch.distributed.all_reduce(counts)
    model.train()
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}


def finetune(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Finetune per ``cfg`` (a ``config.FinetuneConfig``); returns best/last accuracy."""
    train_src, val_src = class_folders(cfg.train, cfg.val)
    device, out = start_task_run(cfg, resume)
    rank, world = du.rank(), du.world_size()

    # model
    sd, enc_cfg = load_pretrained_encoder(
        cfg.encoder.checkpoint, official_arch=cfg.encoder.official_arch
    )
    torch.manual_seed(cfg.seed)
    num_classes = len(train_src.classes)
    if cfg.encoder.random_init:  # the baseline: same architecture, untrained encoder
        torch.manual_seed(cfg.encoder.seed)
        sd = VisionTransformer(**enc_cfg).state_dict()
    model = build_classifier(
        sd,
        enc_cfg,
        num_classes=num_classes,
        img_size=cfg.img_size,
        global_pool=cfg.global_pool,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.probe:  # frozen encoder; only the BatchNorm + Linear head trains
        model.requires_grad_(False)
        model.head = ProbeHead(model.embed_dim, num_classes)
        if cfg.ema_decay:
            raise ConfigError("ema_decay applies to finetuning, not to the linear probe")
    else:
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE finetune head init
    model.to(device)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    seed_all(cfg.seed + rank)  # this process's streams (drop path, augmentations)

    # data
    if cfg.probe:
        tf = T.Compose([  # MAE's main_linprobe.py
            SingleDrawRandomResizedCrop(cfg.img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    else:
        tf = create_transform(
            cfg.img_size, is_training=True, auto_augment=cfg.randaug, interpolation="bicubic",
            re_prob=cfg.reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )  # fmt: skip
    micro, accum = plan_batches(cfg.batch_size, world, cfg.micro_batch)
    sampler = ResumableSampler(
        len(train_src), per_rank_step=micro * accum, num_replicas=world, rank=rank, seed=cfg.seed
    )
    loader = DataLoader(
        _Keyed(Labelled(train_src, tf)),
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # optimizer
    steps_per_epoch = sampler.steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    base_lr = cfg.blr * cfg.batch_size / 256
    if cfg.probe:
        head = [p for p in model.parameters() if p.requires_grad]
        opt = LARS([{"params": head, "lr_scale": 1.0}], lr=base_lr, weight_decay=cfg.weight_decay)
    else:  # one layer-decay implementation, driven by the encoder's layer_id
        groups = param_groups(
            model, cfg.weight_decay, layer_decay=cfg.layer_decay, layer_id=model.layer_id,
            num_layers=model.depth, no_decay_names=model.no_weight_decay(),
        )  # fmt: skip
        opt = torch.optim.AdamW(
            groups, lr=base_lr, betas=tuple(cfg.betas), fused=device.type == "cuda"
        )
    amp = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    step, best = 0, {"top1": -1.0}
    ck = resume_task_run(out, resume, model, opt, scaler)
    if ck:
        if ema is not None:
            ema.module.load_state_dict(ck["ema"])
        step, best = ck["step"], ck["best"]
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    log.info(
        "%d classes, %d train / %d val images, batch %d (%d x %d x %d), lr %.3g, %d steps",
        num_classes,
        len(train_src),
        len(val_src),
        cfg.batch_size,
        world,
        micro,
        accum,
        base_lr,
        total,
    )

    def save(tag: str, acc: dict) -> None:
        rngs = du.all_gather_objects(random_states())
        if rank != 0:
            return
        state = {
            "format": FINETUNE_FORMAT,
            "rng": rngs,
            "model": model.state_dict(),
            "encoder_config": model.config,
            "classes": train_src.classes,
            "step": step,
            "epoch": step // steps_per_epoch,
            "best": best,
            "accuracy": acc,
            "config": to_plain(cfg),
        }
        if tag == LAST:
            state.update(optimizer=opt.state_dict(), scaler=scaler.state_dict())
            if ema is not None:
                state["ema"] = ema.module.state_dict()
        save_atomic(state, out / tag)

    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    acc, interrupted, nonfinite_run = {}, False, 0
    window_loss, window_steps = torch.zeros((), device=device), 0  # since the last record
    with StopRequest() as stop:
        while step < total and not interrupted:
            epoch, start = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start)
            batches = iter(loader)
            for _ in range(start, steps_per_epoch):
                # schedule
                lr = lr_at(
                    step, base_lr=base_lr, total_steps=total, warmup_steps=warmup, min_lr=cfg.min_lr
                )
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                # forward + backward
                loss_sum = torch.zeros((), device=device)
                for k in range(accum):
                    imgs, y = next(batches)
                    imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if mixup is not None:
                        imgs, y = mixup(imgs, y)
                    sync = (
                        contextlib.nullcontext() if world == 1 or k == accum - 1 else ddp.no_sync()
                    )
                    with sync:
                        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            loss = criterion(ddp(imgs).float(), y)
                        scaler.scale(loss / accum).backward()
                    loss_sum += loss.detach() / accum
                # step (skipped on a non-finite loss; all processes agree)
                nonfinite, stopping = stop.agree(loss_sum)
                if nonfinite:
                    opt.zero_grad(set_to_none=True)
                    nonfinite_run += 1
                    log.warning("step %d: non-finite loss, step skipped", step)
                    if nonfinite_run >= MAX_NONFINITE:
                        raise FloatingPointError(
                            f"the loss was non-finite for {nonfinite_run} steps in a row (step "
                            f"{step}); lower blr or set clip_grad"
                        )
                else:
                    nonfinite_run = 0
                    if cfg.clip_grad is not None:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model, step=step)
                step += 1
                # log: the mean loss since the last record
                window_loss += loss_sum
                window_steps += 1
                if step % cfg.log_every == 0 or step == total:
                    loss_value = float(du.all_reduce_mean(window_loss / window_steps))
                    append_record(metrics, {"step": step, "lr": lr, "loss": loss_value})
                    window_loss, window_steps = torch.zeros((), device=device), 0
                if stopping:
                    interrupted = True
                    break
            # evaluate + checkpoint
            if interrupted:
                save(LAST, acc)
                break
            acc = evaluate(model, val_src, cfg.img_size, device)
            if ema is not None:
                acc["ema"] = evaluate(ema.module, val_src, cfg.img_size, device)
            if acc["top1"] > best["top1"]:
                best = {**acc, "epoch": step // steps_per_epoch}
                save("checkpoint-best.pt", acc)
            save(LAST, acc)
            log.info(
                "epoch %d: top-1 %.2f top-5 %.2f (best %.2f)",
                step // steps_per_epoch,
                acc["top1"],
                acc["top5"],
                best["top1"],
            )
            append_record(
                metrics,
                {
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    **{f"val_{k}": v for k, v in acc.items() if k != "ema"},
                },
            )
    if metrics is not None:
        metrics.close()
    result = {
        "output_dir": str(out),
        "step": step,
        "interrupted": interrupted,
        "last": acc,
        "best": best,
    }
    if rank == 0:
        write_text_atomic(out / "results.json", json.dumps(result, indent=1))
    du.barrier()
    if interrupted:
        stop.forward()
    return result
