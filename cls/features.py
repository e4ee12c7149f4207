"""The fast linear probe: features extracted once (``crossmae.knn.extract_features``), cached on
disk, and a grid of learning rates trained in one pass over them."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crossmae import distributed as du
from crossmae.checkpoint import save_atomic
from crossmae.knn import topk_accuracy
from crossmae.optim import LARS, cosine_lr

log = logging.getLogger(__name__)


def cached_features(
    cache_dir: str | Path | None, key: dict, compute
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute()`` once per ``key`` (a JSON-able description), stored in ``cache_dir``."""
    if cache_dir is None:
        return compute()
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features-{name}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        log.info("features from cache %s", path)
        return data["features"], data["labels"]
    feats, labels = compute()
    if du.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(
            {"format": "crossmae-features-v1", "key": key, "features": feats, "labels": labels},
            path,
        )
    return feats, labels


class ProbeHead(nn.Sequential):
    """MAE's linear-probe head: BatchNorm1d(affine=False, eps=1e-6) then Linear (std 0.01)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def linear_probe_grid(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    blrs: list[float],
    epochs: int = 90,
    warmup_epochs: int = 10,
    batch_size: int = 16384,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict:
    """Train one probe head per base lr on cached features, all in the same pass (same batches),
    with LARS and warmup + cosine (lr = blr * batch / 256); return each head's val accuracy, the
    best and the best head's val predictions."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = train_feats.shape[1]
    batch_size = min(batch_size, len(train_feats))
    heads = nn.ModuleList(ProbeHead(dim, num_classes) for _ in blrs)
    lrs = [b * batch_size / 256 for b in blrs]
    groups = [
        {"params": h.parameters(), "lr": lr, "base_lr": lr}
        for h, lr in zip(heads, lrs, strict=True)
    ]
    opt = LARS(groups, weight_decay=weight_decay)
    steps_per_epoch = len(train_feats) // batch_size
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    heads.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_feats), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            x, y = train_feats[idx], train_labels[idx]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(
                    step, base_lr=group["base_lr"], total_steps=total, warmup_steps=warmup
                )
            loss = sum(F.cross_entropy(h(x), y) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    heads.eval()
    with torch.no_grad():
        logits = {blr: h(val_feats) for blr, h in zip(blrs, heads, strict=True)}
    results = {blr: topk_accuracy(out, val_labels) for blr, out in logits.items()}
    best = max(results, key=lambda b: results[b]["top1"])
    return {
        "by_blr": results,
        "best_blr": best,
        **{f"best_{k}": v for k, v in results[best].items()},
        "best_predictions": logits[best].argmax(dim=1),
    }
