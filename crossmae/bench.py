"""The benchmark's own registry: one training step of a task at its recipe's size
(``crossmae benchmark tasks``). A task package registers its case beside its task
(``register_bench_case``); a task without one is not benchmarked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BenchCaseFn = Callable[[bool, int | None, torch.device], "BenchCase"]


@dataclass
class BenchCase:
    """One training step of a task at its recipe's size, for ``crossmae benchmark tasks``.

    Args:
        task: the task, whose ``inputs`` and ``losses`` make the step.
        model: its model, on the device.
        batch: one batch as its loader delivers it.
        images: images per step.
        precision: the recipe's autocast precision.
        evaluate: one evaluation forward (``eval_images`` images).
    """

    task: Any
    model: nn.Module
    batch: Any
    images: int
    precision: str
    evaluate: Callable[[], Any]
    eval_images: int = 1


def bench_encoder(tiny: bool) -> dict[str, Any]:
    """The encoder settings of a benchmark case: ViT-B/16 at 224 px (the size the transfer
    recipes are quoted at), or, ``tiny``, a 4-block 32-wide ViT for CPU checks."""
    if tiny:
        return dict(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2,
                    mlp_ratio=4.0, norm_eps=1e-6)  # fmt: skip
    from .models.sizes import get_size

    base = get_size("base")
    return dict(img_size=224, patch_size=16, embed_dim=base.embed_dim, depth=base.depth,
                num_heads=base.num_heads, mlp_ratio=4.0, norm_eps=1e-6)  # fmt: skip


_CASES: dict[str, BenchCaseFn] = {}


def register_bench_case(task: str) -> Callable[[BenchCaseFn], BenchCaseFn]:
    """Decorator: ``case(tiny, batch, device) -> BenchCase`` is task ``task``'s benchmark step
    (``tiny``: CPU sizes; ``batch``: images per step, None = the recipe's)."""

    def add(case: BenchCaseFn) -> BenchCaseFn:
        if task in _CASES and _CASES[task] is not case:
            raise ValueError(f"task {task!r} already has a benchmark case ({_CASES[task]})")
        _CASES[task] = case
        return case

    return add


def bench_cases() -> dict[str, BenchCaseFn]:
    """Every registered benchmark case, by task name."""
    from .task import load_plugins

    load_plugins()
    return dict(sorted(_CASES.items()))
