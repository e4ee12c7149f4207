"""Supervised training on a pretrained encoder, one loop for both recipes:

- finetuning (MAE / CrossMAE recipe: AdamW, layer-wise lr decay, warmup + cosine, drop path,
  RandAugment, mixup / cutmix, random erasing, label smoothing, average pooling + fc_norm,
  optional EMA, bf16);
- the linear probe (``probe=True``, ``config.LinprobeConfig``: frozen encoder, cls token,
  BatchNorm + Linear head, LARS, RandomResizedCrop + flip).

Accuracy on the val split every epoch with exact distributed counting, best and last
checkpoints, ``--resume auto``.

    torchrun --nproc-per-node 8 -m crossmae cls finetune \
        --config configs/cls/finetune_vit_base.yaml output_dir=... data.train=... data.val=... \
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision.transforms as T
from omegaconf import DictConfig
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from crossmae import distributed as du
from crossmae.checkpoint import seed_all
from crossmae.config import ConfigError, to_plain
from crossmae.data import Labelled, classify_eval_transform
from crossmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SingleDrawRandomResizedCrop
from crossmae.engine import Hooks, finish_task, open_run, task_engine, task_loader
from crossmae.knn import topk_hits
from crossmae.models import VisionTransformer
from crossmae.models.pretrained import load_pretrained_encoder
from crossmae.optim import LARS, lr_at, param_groups

from .data import class_folders
from .encoder import build_classifier
from .features import ProbeHead

log = logging.getLogger("crossmae")
FINETUNE_FORMAT = "crossmae-finetune-v1"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the meaning Pillow used to give 0 bits (a black image). RandAugment's
    increasing posterize reaches 0 bits at magnitude 10 (m9 plus magnitude noise), which Pillow
    13 rejects ("bits must be between or equal to 1 and 8") and which would crash a finetune."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class _Keyed(Dataset):
    """``ResumableSampler`` yields (index, seed); timm's transforms draw from the worker RNG."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        return self.ds[key[0]][:2]


@torch.no_grad()
def evaluate_classifier(
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
        hits = topk_hits(logits.float(), y, ks=(1, min(5, logits.shape[1])))
        counts += torch.stack([hits[1], hits[max(hits)], torch.tensor(len(y), device=device)])
    if du.is_dist():
        torch.distributed.all_reduce(counts)
    model.train()
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}


def training_transform(cfg: DictConfig):
    """The training view: the linear probe's crop + flip (MAE's main_linprobe.py), or timm's
    finetuning pipeline (RandAugment, random erasing) with posterize at 0 bits fixed."""
    d = cfg.data
    if cfg.model.probe:
        return T.Compose([
            SingleDrawRandomResizedCrop(d.img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    tf = create_transform(
        d.img_size, is_training=True, auto_augment=d.randaug, interpolation="bicubic",
        re_prob=d.reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    for t in tf.transforms:  # this pipeline's own posterize ops, not timm's table
        for op in getattr(t, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return tf


def finetune(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Finetune (or, with ``model.probe``, linear-probe) per ``cfg`` (a ``config.FinetuneConfig``);
    returns best/last accuracy."""
    d, m, o = cfg.data, cfg.model, cfg.optim
    train_src, val_src = class_folders(d.train, d.val)
    device = open_run(cfg, resume, cfg.output_dir)
    out = Path(cfg.output_dir)
    rank = du.rank()

    # model
    sd, enc_cfg = load_pretrained_encoder(
        cfg.encoder.checkpoint, official_arch=cfg.encoder.official_arch
    )
    torch.manual_seed(cfg.train.seed)
    num_classes = len(train_src.classes)
    if cfg.encoder.random_init:  # the baseline: same architecture, untrained encoder
        torch.manual_seed(cfg.encoder.seed)
        sd = VisionTransformer(**enc_cfg).state_dict()
    model = build_classifier(
        sd, enc_cfg, num_classes=num_classes, img_size=d.img_size, global_pool=m.global_pool,
        drop_path_rate=m.drop_path_rate,
    )  # fmt: skip
    if m.probe:  # frozen encoder; only the BatchNorm + Linear head trains
        model.requires_grad_(False)
        model.head = ProbeHead(model.embed_dim, num_classes)
        if m.ema_decay:
            raise ConfigError("model.ema_decay applies to finetuning, not to the linear probe")
    else:
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE finetune head init
    model.to(device)
    ema = None
    if m.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=m.ema_decay)
    seed_all(cfg.train.seed + rank)  # this process's streams (drop path, augmentations)

    # data
    train_set = Labelled(train_src, training_transform(cfg), skip_unreadable=True)
    sampler, loader, accum = task_loader(_Keyed(train_set), cfg, device)
    mixup = None
    if d.mixup > 0 or d.cutmix > 0:
        mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix,
                      label_smoothing=d.label_smoothing, num_classes=num_classes)  # fmt: skip
        criterion = SoftTargetCrossEntropy()
    elif d.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(d.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # optimizer
    steps_per_epoch = sampler.steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch
    warmup = round(o.warmup_epochs * steps_per_epoch)
    base_lr = o.blr * cfg.train.batch_size / 256
    if m.probe:
        head = [p for p in model.parameters() if p.requires_grad]
        opt = LARS([{"params": head, "lr_scale": 1.0}], lr=base_lr, weight_decay=o.weight_decay)
    else:  # one layer-decay implementation, driven by the encoder's layer_id
        groups = param_groups(
            model, o.weight_decay, layer_decay=o.layer_decay, layer_id=model.layer_id,
            num_layers=model.depth, no_decay_names=model.no_weight_decay(),
        )  # fmt: skip
        opt = torch.optim.AdamW(
            groups, lr=base_lr, betas=tuple(o.betas), fused=device.type == "cuda"
        )

    best = {"top1": -1.0}

    def evaluate(step: int) -> dict:
        nonlocal best
        acc = evaluate_classifier(model, val_src, d.img_size, device)
        if ema is not None:
            acc["ema"] = evaluate_classifier(ema.module, val_src, d.img_size, device)
        epoch = step // steps_per_epoch
        if acc["top1"] > best["top1"]:
            best = {**acc, "epoch": epoch}
            engine.metrics = acc
            engine.save("checkpoint-best.pt", training_state=False)
        log.info("epoch %d: top-1 %.2f top-5 %.2f (best %.2f)", epoch, acc["top1"], acc["top5"],
                 best["top1"])  # fmt: skip
        val = {f"val_{k}": v for k, v in acc.items() if k != "ema"}
        engine.record({"step": step, "epoch": epoch, **val}, "eval")
        return acc

    def inputs(batch) -> dict:
        imgs, y = batch
        imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            imgs, y = mixup(imgs, y)
        return {"imgs": imgs, "y": y}

    def losses(forward, imgs, y) -> dict[str, torch.Tensor]:
        return {"loss": criterion(forward(imgs).float(), y)}

    def fields() -> dict:
        state = {"format": FINETUNE_FORMAT, "encoder_config": model.config,
                 "classes": train_src.classes, "best": best, "config": to_plain(cfg)}  # fmt: skip
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        return state

    engine = task_engine(
        cfg, model, opt, out=out, device=device, sampler=sampler, loader=loader, accum=accum,
        steps=total, inputs=inputs, losses=losses,
        lr_at=lambda s: lr_at(s, base_lr=base_lr, total_steps=total, warmup_steps=warmup,
                              min_lr=o.min_lr),
        hooks=Hooks(evaluate=evaluate, checkpoint_fields=fields,
                    after_update=(lambda s: ema.update(model, step=s)) if ema else None),
        eval_every_epochs=1, ckpt_every_epochs=1,
    )  # fmt: skip
    ck = engine.resume(resume)
    if ck:
        best = ck["best"]
        if ema is not None:
            ema.module.load_state_dict(ck["ema"])
    log.info("%d classes, %d train / %d val images, batch %d (%d processes x %d accumulation), "
             "lr %.3g, %d steps", num_classes, len(train_src), len(val_src),
             cfg.train.batch_size, du.world_size(), accum, base_lr, total)  # fmt: skip
    return finish_task(engine, out, lambda r: {"last": r["metrics"] or {}, "best": best})
