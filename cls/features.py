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
from crossmae.progress import Progress

log = logging.getLogger("crossmae")


def cached_features(
    cache_dir: str | Path | None, key: dict, compute
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute()`` once per ``key`` (a JSON-able description), stored in ``cache_dir``."""
    if cache_dir is None:
        return compute()
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features-{name}.pt"
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            log.info("features from cache %s", path)
            return data["features"], data["labels"]
        except Exception as e:  # noqa: BLE001 - a cache is only a shortcut: computed again
            log.warning("feature cache %s is unreadable (%s: %s): computed again", path,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
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


def _probe_epoch(heads, combos, inputs, train_labels, opt, g, steps_per_epoch: int,
                 batch_size: int, step: int, total: int, warmup: int) -> None:  # fmt: skip
    """One epoch of every head of the grid on the same batches, from global step ``step``."""
    perm = torch.randperm(len(train_labels), generator=g)
    for s in range(steps_per_epoch):
        idx = perm[s * batch_size : (s + 1) * batch_size]
        y = train_labels[idx]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(
                step + s, base_lr=group["base_lr"], total_steps=total, warmup_steps=warmup
            )
        loss = sum(F.cross_entropy(h(inputs[name][0][idx]), y)
                   for h, (name, _) in zip(heads, combos, strict=True))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def linear_probe_grid(
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    train_labels: torch.Tensor,
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
    """Train one probe head per (input, base lr) on cached features, all in the same pass (the
    same batches), with LARS and warmup + cosine (lr = blr * batch / 256), as dinov2's linear
    evaluation trains its grid. ``inputs``: name -> (train features, val features). Every head
    starts from the same seed, so a head's result does not depend on the rest of the grid.

    Returns ``grid`` (one entry per head: input, blr, top1 / top5), the ``best`` entry and the
    best head's val ``best_predictions``."""
    g = torch.Generator().manual_seed(seed)
    n = len(train_labels)
    batch_size = min(batch_size, n)
    combos = [(name, blr) for name in inputs for blr in blrs]
    heads = nn.ModuleList()
    for name, _ in combos:
        torch.manual_seed(seed)  # the same init whatever else the grid holds
        heads.append(ProbeHead(inputs[name][0].shape[1], num_classes))
    lrs = [blr * batch_size / 256 for _, blr in combos]
    groups = [{"params": h.parameters(), "lr": lr, "base_lr": lr}
              for h, lr in zip(heads, lrs, strict=True)]  # fmt: skip
    opt = LARS(groups, weight_decay=weight_decay)
    steps_per_epoch = n // batch_size
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step = 0
    heads.train()
    desc = f"linear probe grid ({len(heads)} heads, {n} features, batch {batch_size})"
    with Progress(epochs, desc, unit="epochs", every_s=10.0) as progress:
        for _ in range(epochs):
            _probe_epoch(heads, combos, inputs, train_labels, opt, g, steps_per_epoch,
                         batch_size, step, total, warmup)  # fmt: skip
            step += steps_per_epoch
            progress.update()
    heads.eval()
    grid, predictions = [], []
    with torch.no_grad():
        for h, (name, blr) in zip(heads, combos, strict=True):
            logits = h(inputs[name][1])
            grid.append({"input": name, "blr": blr, **topk_accuracy(logits, val_labels)})
            predictions.append(logits.argmax(dim=1))
    best = max(range(len(grid)), key=lambda i: grid[i]["top1"])  # the first of equals
    return {"grid": grid, "best": grid[best], "best_predictions": predictions[best]}
