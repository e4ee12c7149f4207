"""Optimiser parameter groups (weight-decay exclusions, layer-wise lr decay) and learning-rate
schedules as pure functions of the step. The one implementation every task uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    no_decay_names: set[str] = frozenset(),
    weight_decay_of: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW parameter groups.

    Biases, every 1-d parameter (norms) and ``no_decay_names`` get no weight decay, unless
    ``weight_decay_of(name)`` gives each parameter's weight decay (detectron2's rule). With
    ``layer_decay`` (BEiT / MAE finetuning), a parameter at depth ``layer_id(name)`` of
    ``num_layers + 1`` gets ``lr_scale = layer_decay ** (num_layers + 1 - depth)``; each group
    carries ``lr_scale``, which the training loop multiplies into the scheduled lr.
    """
    if layer_decay is not None and (layer_id is None or num_layers is None):
        raise ValueError("layer_decay needs layer_id and num_layers")
    groups: dict[tuple[int, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if weight_decay_of is not None:
            wd = weight_decay_of(name)
        else:
            decay = not (p.ndim <= 1 or name.endswith(".bias") or name in no_decay_names)
            wd = weight_decay if decay else 0.0
        depth = layer_id(name) if layer_decay is not None else 0
        key = (depth, wd)
        if key not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - depth)
            groups[key] = {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then half-cycle cosine from ``base_lr`` down to
    ``min_lr`` at ``total_steps`` (MAE's per-iteration schedule)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_lr(blr: float, global_batch: int, mask_ratio: float, pred_ratio: float) -> float:
    """CrossMAE App. A.6: ``lr = blr * batch / 256 * (γ / p)`` (MAE: γ = p)."""
    return blr * global_batch / 256 * (pred_ratio / mask_ratio)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, arXiv:1708.03888) as MAE's linear probe uses it: for weights
    (ndim > 1) the update ``g + wd * p`` is scaled by ``trust * ||p|| / ||g + wd * p||``; biases
    and norm parameters get the plain momentum update without weight decay.

    Args:
        params: parameters or groups.
        lr: learning rate.
        weight_decay: decoupled into the update of weights only.
        momentum: heavy-ball momentum.
        trust_coefficient: the LARS trust ratio scale.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    ratio = torch.where(
                        (p_norm > 0) & (u_norm > 0), g["trust_coefficient"] * p_norm / u_norm, 1.0
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(update)
                p.add_(mu, alpha=-g["lr"])


def step_lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    milestones: list[int],
    gamma: float = 0.1,
    warmup_factor: float = 0.001,
) -> float:
    """detectron2's schedule: linear warmup from ``warmup_factor * base_lr``, then ``base_lr``
    multiplied by ``gamma`` at each milestone passed (ViTDet: 250 warmup iterations, decays at
    88.9 % and 96.3 % of training)."""
    lr = base_lr * gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def poly_lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = 1e-6,
) -> float:
    """mmsegmentation's schedule: linear warmup from ``warmup_ratio * base_lr``, then polynomial
    decay ``(1 - step / total) ** power`` down to ``min_lr`` (UperNet on ADE20K: 1500 warmup
    iterations, power 1)."""
    lr = (base_lr - min_lr) * (1 - min(step, total_steps) / total_steps) ** power + min_lr
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


def linear_then_poly_lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = 1e-6,
) -> float:
    """mmsegmentation 1.x's schedule, ``LinearLR(start_factor=warmup_ratio, end=warmup_steps)``
    then ``PolyLR(eta_min=min_lr, begin=warmup_steps, end=total_steps)`` stepped per iteration
    (mmengine's): each reaches its end value on its last step, ``end - 1``."""
    if step < warmup_steps:
        span = max(warmup_steps - 1, 1)
        return base_lr * (warmup_ratio + (1 - warmup_ratio) * min(step, span) / span)
    span = max(total_steps - warmup_steps - 1, 1)
    done = min(step - warmup_steps, span)
    return (base_lr - min_lr) * (1 - done / span) ** power + min_lr
