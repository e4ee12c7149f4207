"""Optimisers, parameter groups (weight-decay exclusions, layer-wise lr decay) and learning-rate
schedules as pure functions of the step: the one implementation every task uses, driven by the
``optim`` section every training config shares (``crossmae.config.OptimConfig``).

Three tables name what a config may choose: ``OPTIMIZERS``, ``SCHEDULES`` and
``NO_WEIGHT_DECAY`` (the parameters exempt from weight decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


# ----------------------------------------------------------------------------- parameter groups
def _is_1d(name: str, p: torch.Tensor, module: nn.Module) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


# rules of ``optim.no_weight_decay``: name -> (parameter name, parameter, its module) -> exempt
NO_WEIGHT_DECAY: dict[str, Callable[[str, torch.Tensor, nn.Module], bool]] = {
    "1d": _is_1d,  # every bias and 1-d parameter (norms): MAE, BEiT, mmseg
    "layernorm": lambda n, p, m: isinstance(m, nn.LayerNorm),  # torch LayerNorms: detectron2
    "pos_embed": lambda n, p, m: n.rsplit(".", 1)[-1] == "pos_embed",
    "cls_token": lambda n, p, m: n.rsplit(".", 1)[-1] == "cls_token",
}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_weight_decay: Sequence[str] = ("1d",),
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
) -> list[dict]:
    """Parameter groups of the trainable parameters of ``model``.

    A parameter that one of the ``no_weight_decay`` rules (``NO_WEIGHT_DECAY``) names gets no
    weight decay, every other one ``weight_decay``. With ``layer_decay`` (BEiT / MAE finetuning,
    detectron2's and mmseg's layer decay), a parameter at depth ``layer_id(name)`` of
    ``num_layers + 1`` gets ``lr_scale = layer_decay ** (num_layers + 1 - depth)``; each group
    carries ``lr_scale``, which the training loop multiplies into the scheduled lr.
    """
    if layer_decay is not None and (layer_id is None or num_layers is None):
        raise ValueError("layer_decay needs layer_id and num_layers")
    rules = [NO_WEIGHT_DECAY[r] for r in no_weight_decay]
    owner = {f"{mn}.{pn}" if mn else pn: m for mn, m in model.named_modules()
             for pn, _ in m.named_parameters(recurse=False)}  # fmt: skip
    groups: dict[tuple[int, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if any(rule(name, p, owner[name]) for rule in rules) else weight_decay
        depth = layer_id(name) if layer_decay is not None else 0
        key = (depth, wd)
        if key not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - depth)
            groups[key] = {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def optimizer_groups(model: nn.Module, o) -> list[dict]:
    """``param_groups`` as an ``optim`` section sets them; layer decay reads the model's
    ``layer_id(name)`` and ``num_layers`` (the ViT encoder's contract, which task models pass
    on)."""
    layers = {}
    if o.layer_decay is not None:
        if not hasattr(model, "layer_id"):
            raise ValueError(f"optim.layer_decay={o.layer_decay}: {type(model).__name__} has no "
                             "layer_id(name) to place its parameters in layers")  # fmt: skip
        layers = {"layer_id": model.layer_id, "num_layers": model.num_layers}
    return param_groups(model, o.weight_decay, no_weight_decay=list(o.no_weight_decay),
                        layer_decay=o.layer_decay, **layers)  # fmt: skip


# ----------------------------------------------------------------------------- optimizers
def peak_lr(o, batch_size: int, factor: float = 1.0) -> float:
    """``optim.lr``, or ``optim.blr x batch_size / 256 x factor`` (``factor``: the task's rule,
    γ / p for CrossMAE pretraining, paper App. A.6)."""
    return o.lr if o.lr is not None else o.blr * batch_size / 256 * factor


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


# optimizers by name: (parameter groups, peak lr, optim section, device) -> optimizer
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda groups, lr, o, device: torch.optim.AdamW(
        groups, lr=lr, betas=tuple(o.betas), fused=device.type == "cuda"
    ),
    "lars": lambda groups, lr, o, device: LARS(groups, lr=lr, weight_decay=o.weight_decay),
}


def build_optimizer(groups: list[dict], lr: float, o, device: torch.device):
    """The optimizer ``o.name`` names (``OPTIMIZERS``), over ``groups``."""
    return OPTIMIZERS[o.name](groups, lr, o, device)


# ----------------------------------------------------------------------------- schedules
def cosine_lr(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
    warmup_start: float = 0.0, **_,
) -> float:  # fmt: skip
    """Linear warmup from ``warmup_start x base_lr`` (MAE: 0) over ``warmup_steps``, then
    half-cycle cosine from ``base_lr`` down to ``min_lr`` at ``total_steps`` (MAE's per-iteration
    schedule)."""
    if step < warmup_steps:
        if warmup_start == 0.0:
            return base_lr * step / warmup_steps
        return base_lr * (warmup_start + (1 - warmup_start) * step / warmup_steps)
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def multistep_lr(
    step: int, *, base_lr: float, warmup_steps: int, milestones: Sequence[int],
    gamma: float = 0.1, warmup_start: float = 0.001, **_,
) -> float:  # fmt: skip
    """detectron2's schedule: linear warmup from ``warmup_start x base_lr``, then ``base_lr``
    multiplied by ``gamma`` at each milestone passed (ViTDet: 250 warmup iterations, decays at
    88.9 % and 96.3 % of training)."""
    lr = base_lr * gamma ** sum(step >= m for m in milestones)
    if step < warmup_steps:
        alpha = step / warmup_steps
        lr *= warmup_start * (1 - alpha) + alpha
    return lr


def poly_lr(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, power: float = 1.0,
    min_lr: float = 0.0, warmup_start: float = 1e-6, **_,
) -> float:  # fmt: skip
    """mmsegmentation 0.x's schedule: linear warmup from ``warmup_start x base_lr``, then
    polynomial decay ``(1 - step / total) ** power`` down to ``min_lr`` (UperNet on ADE20K: 1500
    warmup iterations, power 1)."""
    lr = (base_lr - min_lr) * (1 - min(step, total_steps) / total_steps) ** power + min_lr
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_start)
    return lr


def linear_poly_lr(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, power: float = 1.0,
    min_lr: float = 0.0, warmup_start: float = 1e-6, **_,
) -> float:  # fmt: skip
    """mmsegmentation 1.x's schedule, ``LinearLR(start_factor=warmup_start, end=warmup_steps)``
    then ``PolyLR(eta_min=min_lr, begin=warmup_steps, end=total_steps)`` stepped per iteration
    (mmengine's): each reaches its end value on its last step, ``end - 1``."""
    if step < warmup_steps:
        span = max(warmup_steps - 1, 1)
        return base_lr * (warmup_start + (1 - warmup_start) * min(step, span) / span)
    span = max(total_steps - warmup_steps - 1, 1)
    done = min(step - warmup_steps, span)
    return (base_lr - min_lr) * (1 - done / span) ** power + min_lr


# schedules by name: (step, *, base_lr, total_steps, warmup_steps, warmup_start, min_lr,
# milestones, gamma, power) -> lr; each reads what it needs
SCHEDULES: dict[str, Callable[..., float]] = {
    "cosine": cosine_lr,
    "multistep": multistep_lr,
    "poly": poly_lr,
    "linear_poly": linear_poly_lr,
}


@dataclass(frozen=True)
class Schedule:
    """The lr of each step, a pure function of the step (``schedule(step)``): ``SCHEDULES[name]``
    with these settings."""

    name: str
    base_lr: float
    total_steps: int
    warmup_steps: int
    warmup_start: float = 0.0
    min_lr: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 1.0

    def __call__(self, step: int) -> float:
        settings = {k: v for k, v in vars(self).items() if k != "name"}
        return SCHEDULES[self.name](step, **settings)


def make_schedule(o, base_lr: float, total_steps: int, steps_per_epoch: int) -> Schedule:
    """The ``Schedule`` an ``optim`` section sets; warmup in steps (``warmup_epochs`` rounded to
    whole steps)."""
    if o.warmup_epochs is not None:
        warmup = round(o.warmup_epochs * steps_per_epoch)
    else:
        warmup = o.warmup_steps or 0
    return Schedule(o.schedule, base_lr, total_steps, warmup, o.warmup_start, o.min_lr,
                    tuple(o.milestones), o.gamma, o.power)  # fmt: skip
