"""The task interface and the registries the application enumerates.

A task is what pretraining, finetuning, the linear probe, frozen-feature evaluation, detection
and segmentation each are: a small object that says only what is its own (``Task``): its config
schema, its data, its model on an encoder, the losses of a batch, its evaluation, its checkpoint
format and the numbers it reports. Everything else (run folder and lock, config.yaml, logging,
seeding, loaders, optimiser, schedule, engine, resume, the final checkpoint-then-evaluate order,
results.json) is the runner's, the same for every task (``crossmae.runner.run_task``).

Tasks register themselves (``register_task``); so do the commands a task package adds
(``register_command``). The command line, ``crossmae benchmark tasks``, ``crossmae ablate`` and
the transfer stages (``crossmae transfer``, ``tools/transfer.sh``) read these registries and name
no task package: a package is found through its ``crossmae.plugins`` entry point
(``load_plugins``), so a new task touches no file outside its own package.

The order of a training run, for orientation (the runner's):
``task = Task(cfg)`` -> ``open_data()`` -> run folder -> seed -> ``build_model(device)`` ->
``train_set()`` / ``collate_fn()`` -> ``param_groups(model)`` -> engine with ``inputs`` / ``losses``
and the hooks (``hooks()``, ``evaluation()`` at its intervals) -> resume (``restore``) ->
train -> checkpoint, final evaluation, checkpoint -> ``result_fields(result)`` ->
``after_run(result)`` and results.json.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, default_collate

from .command_index import PLUGIN_GROUP
from .evaluation import Evaluation

log = logging.getLogger("crossmae")


@dataclass(frozen=True)
class EncoderScore:
    """The evaluation ``crossmae ablate`` runs on every encoder it compares (and on the untrained
    control): a stage that declares one scores encoders on their frozen features.

    Args:
        settings: ``(encoder file, train folder, val folder, image size, data workers)`` -> the
            stage's settings that score that encoder on those folders (its CPU-sized defaults
            included); ``crossmae ablate``'s ``STAGE.KEY=VALUE`` settings go over them.
        scores: a finished run's metrics -> ``{"knn_top1": ..., "probe_top1": ...}``.
    """

    settings: Callable[[Path, str, str, int, int], list[str]]
    scores: Callable[[dict], dict[str, float]]


@dataclass(frozen=True)
class TransferStage:
    """How ``crossmae transfer`` (``tools/transfer.sh``) runs a task on a pretrained checkpoint.

    Args:
        name: the stage's name (``--stages``) and its folder under the output.
        order: its place in the default stage list.
        config: the config file per ViT size, relative to the repository, with ``{size}`` for the
            size's name (``crossmae.models.sizes``); a glob pattern is allowed.
        datasets: environment variable -> the settings it fills, ``{root}`` standing for its value
            (``{"COCO": ("data.train_json={root}/annotations/...", ...)}``).
        columns: the results table's rows: (label, keys of the task's ``headline``).
        default: among the stages a checkpoint's transfer runs when ``--stages`` names none.
        curve: among the stages a transfer curve (``--curve``) runs when ``--stages`` names none:
            the cheap evaluations, repeated for every kept checkpoint of a run.
        cpu_config: a CPU-sized config of the stage on the shared data (relative to the
            repository), which ``crossmae ablate --transfer`` runs on every encoder it compares.
        headline: a finished run's results.json -> the numbers the transfer table reports
            (the keys of ``columns``; a ``note`` saying why one is null). None: no numbers.
        smoke: ``(shared, scratch) -> (config file, settings)`` that run the stage for a few
            steps on ``shared``'s small data on a CPU (``crossmae transfer --smoke``; ``scratch``
            is a folder for data it prepares). None: the stage has no smoke run.
        scores_encoders: the stage is ``crossmae ablate``'s evaluation of every encoder
            (``EncoderScore``; one registered stage declares it). None: it is not.
    """

    name: str
    order: int
    config: str
    datasets: dict[str, tuple[str, ...]]
    columns: tuple[tuple[str, tuple[str, ...]], ...]
    default: bool = True
    curve: bool = False
    cpu_config: str | None = None
    headline: Callable[[dict], dict[str, Any]] | None = None
    smoke: Callable[[Path, Path], tuple[str, list[str]]] | None = None
    scores_encoders: EncoderScore | None = None

    def numbers(self, result: dict) -> dict[str, Any]:
        """``headline(result)`` ({} without a headline)."""
        return dict(self.headline(result)) if self.headline is not None else {}


class Task:
    """Base of every task. A subclass sets the class attributes and overrides what it has; one
    instance serves one run (``Task(cfg)`` is cheap: nothing is read before ``open_data``).

    Class attributes:
        name: registry key, e.g. ``"finetune"``.
        command: the command-line words that run it, e.g. ``("cls", "finetune")``.
        help: one line for ``--help``.
        schema: its config dataclass (sections ``encoder`` / ``data`` / ``model`` / ``optim`` /
            ``train`` / ``log`` / ``eval``; ``optim``, ``train`` and ``log`` are the shared ones,
            ``crossmae.config``).
        format: the ``"format"`` of its checkpoints (``crossmae.checkpoint.register_format``).
        transfer: how ``crossmae transfer`` runs it (None: not a transfer stage).

    A task whose schema has no ``optim`` section trains nothing (frozen features): the runner
    builds its model and runs its ``evaluation()`` once (``crossmae.runner``).
    """

    name: ClassVar[str]
    command: ClassVar[tuple[str, ...]]
    help: ClassVar[str] = ""
    schema: ClassVar[type]
    format: ClassVar[str | None] = None
    transfer: ClassVar[TransferStage | None] = None

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.model: nn.Module | None = None  # set by the runner from build_model
        self.device: torch.device | None = None  # set by the runner before open_data

    # ------------------------------------------------------------------ before anything is written
    def open_data(self) -> None:
        """Open the datasets and check what the settings need; an error here leaves no trace."""

    def output_dir(self) -> str | None:
        """The run folder (every process gets rank 0's answer)."""
        return self.cfg.output_dir

    def resolve(self, cfg: DictConfig) -> None:
        """Decide the settings whose value means "the default" (``None``), in place: the run's
        config.yaml then says what was used."""

    def engine_options(self) -> dict[str, Any]:
        """``crossmae.engine.StepOptions`` beyond the shared ``train`` / ``optim`` settings."""
        return {}

    # ------------------------------------------------------------------ model and optimizer
    def build_model(self, device: torch.device) -> nn.Module:
        """The model, on ``device`` (torch is seeded with ``train.seed`` before the call)."""
        raise NotImplementedError

    def lr_factor(self) -> float:
        """The task's factor in the lr rule ``blr x batch / 256 x factor``."""
        return 1.0

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's parameter groups (default: the ``optim`` section's rules)."""
        from .optim import optimizer_groups

        return optimizer_groups(model, self.cfg.optim)

    # ------------------------------------------------------------------ data and the step
    def train_set(self) -> Dataset:
        """The training set, indexed by the sampler's ``(index, seed)`` keys."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list], Any]:
        """The loader's collate function (a module-level function: workers may pickle it)."""
        return default_collate

    def inputs(self, batch: Any, device: torch.device) -> dict[str, Any]:
        """A loader batch -> the keyword inputs of ``losses``, on ``device``."""
        raise NotImplementedError

    def losses(self, model: nn.Module, **inputs: Any) -> dict[str, torch.Tensor]:
        """The named losses of one micro-batch and their total, ``"loss"``; ``model`` is the
        task's model as the engine wraps it (``crossmae.engine.prepare_model``: DDP,
        compiled)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    def evaluation(self) -> Evaluation | None:
        """The task's evaluation on its held-out data, its intervals and how its result is
        logged and kept (called once the model is built); None: the task has none."""
        return None

    # ------------------------------------------------------------------ checkpoints and results
    def checkpoint_fields(self) -> dict[str, Any]:
        """What every checkpoint holds besides the model and the training state (plain values)."""
        return {}

    def restore(self, ckpt: dict) -> None:
        """Restore what ``checkpoint_fields`` saved, when a run resumes."""

    def exports(self, step: int) -> dict[str, dict]:
        """Files kept current beside ``checkpoint-last.pt`` (name -> what it holds after
        ``step`` steps), written with every checkpoint whose last step was finite, so an
        interrupted run has them too."""
        return {}

    def hooks(self) -> list:
        """The task's own loop hooks (``crossmae.engine.Hook``), run before evaluation and
        checkpoints at each step and epoch."""
        return []

    def record_fields(self) -> dict[str, Any]:
        """Extra fields of every training record."""
        return {}

    def result_fields(self, result: dict) -> dict[str, Any]:
        """What results.json holds besides step, metrics and the run's state (every process
        calls it)."""
        return {}

    def after_run(self, result: dict) -> None:
        """After the final checkpoint and evaluation, on rank 0 of a finished run (exports)."""

    # ------------------------------------------------------------------ memory planning
    def plan_data(self) -> None:
        """Instead of ``open_data`` for the memory planner (``crossmae.memory``): set what
        ``build_model`` needs (class counts, the encoder) from the config alone, reading no data."""
        raise NotImplementedError

    def example_batch(self, batch: int, training: bool = True) -> Any:
        """One batch of ``batch`` samples as the loader delivers it (``training``) or as
        ``plan_evaluation`` takes it, at the config's sizes, random content; for a variable
        number of objects, the most the config lets through."""
        raise NotImplementedError

    def plan_evaluation(self, model: nn.Module, batch: Any, device: torch.device) -> Any:
        """One evaluation forward of ``model`` (eval mode, no gradients) on ``batch`` (default:
        the training losses)."""
        return self.losses(model, **self.inputs(batch, device))


# ----------------------------------------------------------------------------- registries
_TASKS: dict[str, type[Task]] = {}
_COMMANDS: dict[tuple[str, ...], dict[str, Any]] = {}  # words -> {help, configure, ...}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task known by its ``name``. A name, a command or a transfer
    stage name that another task has already is an error naming both (a plugin cannot replace
    a built-in task)."""
    for other in _TASKS.values():
        if other is cls:
            continue
        same = ("name", cls.name) if other.name == cls.name else (
            ("command", " ".join(cls.command)) if tuple(other.command) == tuple(cls.command)
            else ("transfer stage", cls.transfer.name) if cls.transfer and other.transfer
            and other.transfer.name == cls.transfer.name else None)  # fmt: skip
        if same:
            raise ValueError(f"{_where(cls)} has the {same[0]} {same[1]!r} of "
                             f"{_where(other)}: not registered")  # fmt: skip
    _TASKS[cls.name] = cls
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_task(name: str) -> type[Task]:
    load_plugins()
    if name not in _TASKS:
        near = difflib.get_close_matches(name, _TASKS, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise KeyError(f"unknown task {name!r}{hint} (tasks: {', '.join(sorted(_TASKS))})")
    return _TASKS[name]


def tasks() -> Iterator[type[Task]]:
    """Every registered task, in name order."""
    load_plugins()
    return iter([_TASKS[n] for n in sorted(_TASKS)])


def transfer_stages() -> list[type[Task]]:
    """The tasks that are transfer stages, in their stage order."""
    return sorted((t for t in tasks() if t.transfer is not None), key=lambda t: t.transfer.order)


def encoder_scorer() -> type[Task]:
    """The transfer stage that scores encoders for ``crossmae ablate`` (``EncoderScore``)."""
    found = [t for t in transfer_stages() if t.transfer.scores_encoders is not None]
    if len(found) != 1:
        have = ", ".join(t.transfer.name for t in found) or (
            "none (the cls package provides one, cls frozen: pip install -e .)"
        )
        raise RuntimeError(
            "crossmae ablate needs exactly one registered transfer stage that "
            f"scores encoders (TransferStage.scores_encoders); found {have}"
        )
    return found[0]


def register_command(
    words: tuple[str, ...], help: str = "", description: str | None = None
) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable]:
    """Decorator: ``configure(parser)`` adds a command's arguments and sets its ``func``; a
    command of several words sits under the groups its first words name (``register_group``)."""

    def add(configure: Callable[[argparse.ArgumentParser], None]) -> Callable:
        known = _COMMANDS.get(tuple(words))
        if known is not None and known["configure"] is not None and (
                known["configure"].__qualname__, known["configure"].__module__) != (
                configure.__qualname__, configure.__module__):  # fmt: skip
            raise ValueError(f"command {' '.join(words)!r} of {configure.__module__} is "
                             f"{known['configure'].__module__}'s: not registered")  # fmt: skip
        _COMMANDS[tuple(words)] = {"help": help, "description": description,
                                   "configure": configure}  # fmt: skip
        return configure

    return add


CONVERTER_ERRORS = (RuntimeError,)  # + torch's load_state_dict: one line, not a traceback
FORCE_HELP = "replace DEST even if it is a checkpoint of another kind"


def register_converter(name: str, help: str) -> Callable[[Callable], Callable]:
    """Decorator: ``crossmae convert NAME SRC DEST [--official-arch ARCH] [--force]`` runs the
    decorated ``func(args)``: an encoder (any checkpoint ``load_pretrained_encoder`` reads) ->
    ``args.dest``. The library registers its own (timm), task packages theirs (detectron2's,
    mmseg's) beside their commands."""

    def add(func: Callable) -> Callable:
        def configure(p: argparse.ArgumentParser) -> None:
            p.add_argument("src")
            p.add_argument("dest")
            p.add_argument("--official-arch", default=None, help="for an official release input")
            p.add_argument("--force", action="store_true", help=FORCE_HELP)
            p.set_defaults(func=func, errors=CONVERTER_ERRORS)

        register_command(("convert", name), help=help)(configure)
        return func

    return add


def register_group(words: tuple[str, ...], help: str, description: str | None = None) -> None:
    """A command group (``crossmae det ...``): its help, and the commands registered under it."""
    _COMMANDS[tuple(words)] = {"help": help, "description": description, "configure": None}


def commands() -> dict[tuple[str, ...], dict[str, Any]]:
    load_plugins()
    return dict(_COMMANDS)


_loaded = False


def load_plugins() -> None:
    """Import every module named by a ``crossmae.plugins`` entry point (once; this
    distribution's own first): each registers its tasks and commands. A plugin that fails to
    import (a syntax error, a missing module, an exception, a name a built-in has) is one
    warning naming it and why; every other command still works."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=_builtin_first):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - one broken plugin must not break the others
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning("crossmae plugin %r (%s) was not loaded: %s: %s", ep.name, ep.value,
                        type(e).__name__, first)  # fmt: skip
            PLUGIN_ERRORS[ep.name] = f"{type(e).__name__}: {first}"


PLUGIN_ERRORS: dict[str, str] = {}  # plugin -> why it was not loaded


def _builtin_first(ep) -> tuple[bool, str]:
    dist = getattr(ep, "dist", None)
    return (getattr(dist, "name", None) != "crossmae", ep.name)
