"""Frozen-encoder evaluations: feature extraction (cached on disk), the kNN classifier (k = 20,
cosine, temperature-weighted votes; Wu et al. 2018 / DINO) and the fast linear probe (features
once, a grid of learning rates in one pass)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from crossmae import distributed as du
from crossmae.checkpoint import save_atomic
from crossmae.models import VisionTransformer
from crossmae.optim import LARS, lr_at

from .data import Labelled, eval_transform, shard

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    encoder: VisionTransformer,
    source,
    *,
    img_size: int,
    pool: str = "cls",
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) of every image of ``source``, in order.

    ``pool``: ``"cls"`` (the cls token) or ``"avg"`` (mean of patch tokens), both taken from
    ``forward_features`` (after the encoder's final ``norm`` if it has one). Under torch.distributed
    each process extracts its own shard and all receive the full, ordered result.
    """
    if pool not in ("cls", "avg"):
        raise ValueError(f"pool must be 'cls' or 'avg', got {pool!r}")
    encoder = encoder.to(device).eval()
    idx = shard(len(source), du.rank(), du.world_size())
    ds = torch.utils.data.Subset(Labelled(source, eval_transform(img_size)), idx)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    feats, labels, order = [], [], []
    for imgs, y, i in loader:
        tokens = encoder.forward_features(imgs.to(device))  # (B, 1 + L, D)
        f = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
        feats.append(f.float().cpu())
        labels.append(y)
        order.append(i)
    parts = du.all_gather_objects((torch.cat(order), torch.cat(feats), torch.cat(labels)))
    order = torch.cat([p[0] for p in parts]).argsort()
    return torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]


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


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, C): each test feature's k nearest training features by cosine
    similarity vote for their class with weight exp(similarity / temperature)."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, nn_idx = (q @ train.T).topk(k, dim=1)  # (n, k)
        votes = F.one_hot(train_labels[nn_idx], num_classes).float()  # (n, k, C)
        scores.append((votes * (sim / temperature).exp().unsqueeze(-1)).sum(dim=1))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (a k above the number of classes is left out)."""
    ks = [k for k in ks if k <= scores.shape[1]]
    hit = scores.topk(max(ks), dim=1).indices == labels.unsqueeze(1)  # (N, max k)
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


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
    with LARS and warmup + cosine (lr = blr * batch / 256); return each head's val accuracy and
    the best."""
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
                group["lr"] = lr_at(
                    step, base_lr=group["base_lr"], total_steps=total, warmup_steps=warmup
                )
            loss = sum(F.cross_entropy(h(x), y) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    heads.eval()
    with torch.no_grad():
        results = {
            blr: topk_accuracy(h(val_feats), val_labels) for blr, h in zip(blrs, heads, strict=True)
        }
    best = max(results, key=lambda b: results[b]["top1"])
    return {
        "by_blr": results,
        "best_blr": best,
        **{f"best_{k}": v for k, v in results[best].items()},
    }
