"""kNN accuracy and the fast linear probe of a frozen pretrained encoder.

    crossmae cls frozen --config configs/cls/frozen_cifar10_tiny.yaml \
        encoder.checkpoint=runs/cifar10-crossmae-tiny/encoder.pt
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from crossmae import distributed as du
from crossmae.config import to_plain
from crossmae.knn import extract_features, knn_classify, topk_accuracy
from crossmae.models import VisionTransformer
from crossmae.models.pretrained import load_pretrained_encoder

from .data import class_folders
from .features import cached_features, linear_probe_grid

log = logging.getLogger(__name__)


def frozen_encoder(src: DictConfig) -> tuple[VisionTransformer, dict]:
    """The encoder of a checkpoint (or its architecture untrained), ready for feature extraction."""
    sd, cfg = load_pretrained_encoder(src.checkpoint, official_arch=src.official_arch)
    torch.manual_seed(src.seed)
    encoder = VisionTransformer(**cfg)
    if not src.random_init:
        encoder.load_state_dict(sd, strict=True)
    return encoder, cfg


def evaluate_frozen(cfg: DictConfig) -> dict:
    """kNN top-1/5 and the best linear-probe top-1/5 over ``probe.blrs``; writes ``cfg.output``."""
    device = du.init_from_env()
    d = cfg.data
    train, val = class_folders(d.train, d.val)
    encoder, enc_cfg = frozen_encoder(cfg.encoder)
    if tuple(encoder.img_size) != (d.img_size, d.img_size):
        encoder.set_img_size(d.img_size)
    ckpt = Path(cfg.encoder.checkpoint)
    key = {
        "checkpoint": str(ckpt.resolve()),
        "mtime": ckpt.stat().st_mtime,
        "random_init": cfg.encoder.random_init,
        "seed": cfg.encoder.seed,
        "img_size": d.img_size,
        "pool": cfg.pool,
    }

    def features(split):
        def compute():
            return extract_features(
                encoder, split, img_size=d.img_size, pool=cfg.pool,
                batch_size=d.batch_size, num_workers=d.num_workers, device=device,
            )  # fmt: skip

        return cached_features(d.cache_dir, {**key, "split": str(split.root.resolve())}, compute)

    (ftr, ytr), (fva, yva) = features(train), features(val)
    C = len(train.classes)
    knn = topk_accuracy(knn_classify(ftr, ytr, fva, num_classes=C, k=cfg.knn.k,
                                     temperature=cfg.knn.temperature), yva)  # fmt: skip
    probe = linear_probe_grid(
        ftr, ytr, fva, yva, num_classes=C, blrs=list(cfg.probe.blrs), epochs=cfg.probe.epochs,
        warmup_epochs=cfg.probe.warmup_epochs, batch_size=cfg.probe.batch_size,
        weight_decay=cfg.probe.weight_decay, seed=cfg.encoder.seed,
    )  # fmt: skip
    result = {
        "checkpoint": cfg.encoder.checkpoint,
        "weights": "random init" if cfg.encoder.random_init else "pretrained",
        "train_images": len(train),
        "val_images": len(val),
        "knn_top1": knn["top1"],
        "knn_top5": knn.get("top5"),
        "linprobe_top1": probe["best_top1"],
        "linprobe_top5": probe.get("best_top5"),
        "linprobe_best_blr": probe["best_blr"],
        "linprobe_by_blr": {str(k): v for k, v in probe["by_blr"].items()},
        "config": to_plain(cfg),
    }
    if cfg.output and du.is_main():
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=1))
    return result
