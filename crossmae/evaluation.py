"""Evaluation as its own object: an evaluator says what a model's outputs are worth
(``DatasetEvaluator``: ``reset`` / ``process(inputs, outputs)`` / ``evaluate()``, as detectron2's
``DatasetEvaluator``), and one loop runs a model over a dataset for it
(``inference_on_dataset``). The loop alone owns what every evaluation shares: each process takes
its own shard (every item counted once, no padding), the model in eval mode without gradients
and its mode restored after, the evaluation precision (autocast), progress, and the gathering
of every process's part before ``evaluate``. Classification top-1 (``cls``), COCO AP (``det``),
mIoU (``seg``) and the frozen features of kNN and the linear probe (``crossmae.knn``) are
evaluators of this loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import distributed as du
from .data import Loader
from .precision import autocast_dtype
from .report import Progress


class DatasetEvaluator:
    """What a model's outputs over a dataset are worth.

    ``reset`` starts an evaluation, ``process(inputs, outputs)`` takes one batch and the model's
    outputs for it, ``evaluate`` returns the metrics (every process gets them). What ``process``
    keeps goes in ``self.results`` (a list); under torch.distributed the loop replaces it with
    every process's list, in rank order, before ``evaluate``. An evaluator whose part is better
    summed than listed (a confusion matrix) overrides ``part`` and ``combine``.

    Class attributes:
        desc: what the progress line counts ("COCO inference").
        main_only: ``evaluate`` runs on the main process only (after the gathering), and every
            process gets its metrics (COCOeval: once, not once per process).
    """

    desc: str = "evaluation"
    main_only: bool = False

    def reset(self) -> None:
        self.results: list = []

    def model_inputs(self, batch: Any, device: torch.device) -> Any:
        """What the model is called with, from one loader batch (default: its first element, on
        ``device``)."""
        return batch[0].to(device)

    def process(self, inputs: Any, outputs: Any) -> None:
        """Take one batch (``inputs``: the loader's batch) and the model's ``outputs``."""
        raise NotImplementedError

    def part(self) -> Any:
        """This process's share of what ``process`` kept (picklable)."""
        return self.results

    def combine(self, parts: list) -> None:
        """Every process's ``part``, in rank order: the whole."""
        self.results = [r for part in parts for r in part]

    def evaluate(self) -> dict:
        """The metrics of everything processed (on every process)."""
        raise NotImplementedError


def first_item(batch: list) -> Any:
    """A collate function for ``batch_size=1`` that passes the one item as it is (an image of
    its own size, not stacked)."""
    return batch[0]


@torch.no_grad()
def inference_on_dataset(
    model: nn.Module,
    dataset: Dataset,
    evaluator: DatasetEvaluator,
    *,
    precision: str,
    batch_size: int = 1,
    collate_fn: Callable[[list], Any] | None = None,
    num_workers: int = 0,
) -> dict:
    """Run ``model`` over ``dataset`` for ``evaluator`` and return its metrics.

    Each process takes its own shard (items ``rank, rank + world, ...``), the model runs in
    eval mode under ``torch.no_grad`` and autocast at ``precision`` (a name of
    ``crossmae.precision.PRECISIONS``), and its mode is restored after, also when an evaluation
    fails. Every process's part is gathered before ``evaluator.evaluate()``, whose metrics
    every process returns. ``collate_fn``: the loader's (None: torch's default; ``first_item``
    passes single items as they are).
    """
    dtype = autocast_dtype(precision, "eval.precision")
    param = next(model.parameters(), None)  # a model without parameters runs on the CPU
    device = param.device if param is not None else torch.device("cpu")
    idx = du.shard(len(dataset), du.rank(), du.world_size())
    loader = Loader(Subset(dataset, idx), batch_size=batch_size, num_workers=num_workers,
                    collate_fn=collate_fn)  # fmt: skip
    evaluator.reset()
    was_training = model.training
    model.eval()
    try:
        with Progress(len(idx), evaluator.desc) as bar:
            for batch in loader:
                inputs = evaluator.model_inputs(batch, device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    outputs = model(inputs)
                evaluator.process(batch, outputs)
                bar.update(len(outputs))
    finally:
        model.train(was_training)
    evaluator.combine(du.all_gather_objects(evaluator.part()))
    if not evaluator.main_only:
        return evaluator.evaluate()
    return du.all_gather_objects(evaluator.evaluate() if du.is_main() else None)[0]
