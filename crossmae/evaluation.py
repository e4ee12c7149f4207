"""Evaluation as its own object: an evaluator says what a model's outputs are worth
(``DatasetEvaluator``: ``reset`` / ``process(inputs, outputs)`` / ``evaluate()``, as detectron2's
``DatasetEvaluator``), and one loop runs a model over a dataset for it
(``inference_on_dataset``). The loop alone owns what every evaluation shares: each process takes
its own shard (every item counted once, no padding), the model in eval mode without gradients
and its mode restored after, the evaluation precision (autocast), progress, and the gathering
of every process's part before ``evaluate``. Classification top-1 (``cls``), COCO AP (``det``),
mIoU (``seg``) and the frozen features of kNN and the linear probe (``crossmae.knn``) are
evaluators of this loop.

A task hands the runner its evaluation as one object (``Evaluation``): what to run after a
number of steps, how often, and how its result is logged, kept and drawn. The runner's
evaluation hook takes that object, not the task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import distributed as du
from .data import Loader
from .precision import autocast_dtype
from .progress import Progress


def numbers_line(metrics: dict) -> str:
    """``key value`` for each number of ``metrics``, one line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))


@dataclass(frozen=True)
class Evaluation:
    """A task's evaluation as the runner runs it (``Task.evaluation``).

    Args:
        run: steps taken -> the metrics on the task's held-out data (every process calls it;
            usually ``inference_on_dataset`` with the task's evaluator).
        every_steps, every_epochs: the intervals between evaluations during training (0: at the
            end only).
        line: metrics -> one log line (default: every number).
        tables: metrics -> the tables logged below that line (per class, per category); None:
            none.
        best: a key of the metrics: the best evaluation so far is kept as ``checkpoint-best.pt``
            and in the results. None: no best.
        group, prefix: where the metrics go in metrics.jsonl / TensorBoard.
        curve: metrics (nested keys joined by "/") -> label, drawn against the step after every
            evaluation (``evaluation.md`` / ``.png``); empty: ``best``.
    """

    run: Callable[[int], dict]
    every_steps: int = 0
    every_epochs: int = 0
    line: Callable[[dict], str] = numbers_line
    tables: Callable[[dict], str] | None = None
    best: str | None = None
    group: str = "eval"
    prefix: str = ""
    curve: dict[str, str] = field(default_factory=dict)

    def curve_keys(self) -> dict[str, str]:
        """The record keys of the curve (``prefix`` + key) -> label."""
        curve = self.curve or ({self.best: self.best} if self.best else {})
        return {self.prefix + k: label for k, label in curve.items()}


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
    every process returns. A failure on any process (an unreadable image, a model error) is an
    ``EvaluationError`` on every process, its data workers shut down. ``collate_fn``: the
    loader's (None: torch's default; ``first_item`` passes single items as they are).
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
    batches = iter(loader)
    failed, cause = None, None
    try:
        with Progress(len(idx), evaluator.desc) as bar:
            for batch in batches:
                inputs = evaluator.model_inputs(batch, device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    outputs = model(inputs)
                evaluator.process(batch, outputs)
                bar.update(len(outputs))
    except Exception as e:  # noqa: BLE001 - every process must learn of it (below)
        failed, cause = failure_of(e), e
    finally:
        model.train(was_training)
        if hasattr(batches, "_shutdown_workers"):  # no data worker outlives its evaluation
            batches._shutdown_workers()
        del batches
    parts = du.all_gather_objects((failed, None if failed else evaluator.part()))
    _raise_if_failed([f for f, _ in parts], evaluator, cause)
    evaluator.combine([p for _, p in parts])
    if not evaluator.main_only:
        return evaluator.evaluate()
    metrics, failed = None, None
    if du.is_main():
        try:
            metrics = evaluator.evaluate()
        except Exception as e:  # noqa: BLE001 - the other processes wait for the answer
            failed, cause = failure_of(e), e
    metrics, failed = du.all_gather_objects((metrics, failed))[0]
    _raise_if_failed([failed], evaluator, cause)
    return metrics


def failure_of(error: Exception) -> str:
    """One line naming an error, also one raised in a data worker (whose message torch fills
    with the worker's traceback: its last line is the error itself)."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[1].startswith("Original Traceback"):
        name, sep, message = lines[-1].partition(":")
        return f"{name.rpartition('.')[2]}{sep}{message}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class EvaluationError(RuntimeError):
    """An evaluation failed on some process; every process raises it (none is left waiting)."""


def _raise_if_failed(failures: list[str | None], evaluator: DatasetEvaluator,
                     cause: BaseException | None) -> None:  # fmt: skip
    """An ``EvaluationError`` on every process if one failed (chained to this process's own
    error, if it had one: its traceback for a debugger; the command line prints one line)."""
    bad = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if bad:
        rank, failure = bad[0]
        where = f" (process {rank})" if du.world_size() > 1 else ""
        raise EvaluationError(f"{evaluator.desc} failed{where}: {failure}") from cause
