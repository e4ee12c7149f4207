"""The training engine: the one loop that every task trains on (``crossmae.runner`` builds it).

``Engine(model, optimizer, loader, schedule, task, ...)`` runs steps: the lr of ``schedule(step)``
(times each parameter group's ``lr_scale``), micro-batches of ``task.inputs`` / ``task.losses``
under autocast with DDP's gradient sync on the last only, the loss scaler, a step skipped on a
non-finite loss (every process agrees; ``max_nonfinite`` in a row stop the run), gradient
clipping, and optionally ``torch.compile`` and a CUDA-graph replay of forward + backward
(``StepOptions``). What varies around the loop is a short list of ``Hook`` objects, called in
order after each step and each epoch (``crossmae.hooks``: metrics, evaluation, checkpoints; the
tasks' own: reconstruction images, an EMA). SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT end the loop
after the current step, with ``stopping`` set for the hooks (the checkpoint hook saves then).

The per-process sampler (``ResumableSampler``) makes the batch order a function of the epoch, so a
run resumed at step s reads the same batches as the uninterrupted one from step s on; the
engine's state (``state_dict``) holds the model, optimizer, scaler, position and the hooks'
state, and ``load_state_dict`` also restores this process's random streams.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import distributed as du
from .checkpoint import load_state_dict_strict, random_states, restore_random_states
from .config import ConfigError
from .data import CudaPrefetcher, ResumableSampler
from .data.loader import STOP_SIGNALS
from .models.layers import set_activation_checkpointing
from .precision import autocast_dtype

log = logging.getLogger("crossmae")


class StopRequest:
    """Records a stop signal (``STOP_SIGNALS``: SIGTERM, SIGINT, SIGHUP, ...) so the loop can
    stop at the next step boundary. On exit, the previous handlers come back; ``pass_on()``
    then re-raises the signal to a previous Python handler (e.g. submitit's, which requeues the
    job), the command line's own excepted."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for s in STOP_SIGNALS:
            if s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN:
                continue  # started under nohup: a closed terminal must not stop the run
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(is the loss non-finite on any process, has any process been signalled): every
        process gets the same answer, so all skip the same step and stop at the same step."""
        flags = torch.stack(
            [~torch.isfinite(loss), loss.new_tensor(self.signum is not None, dtype=torch.bool)]
        )
        nonfinite, stopping = du.all_reduce_max(flags.float()).tolist()
        return bool(nonfinite), bool(stopping)

    def pass_on(self) -> None:
        """Pass a received signal on to a previous Python handler (Ctrl-C's default one, which
        would only print a KeyboardInterrupt traceback, excepted)."""
        prev = self._previous.get(self.signum)
        ours = prev is signal.default_int_handler or getattr(prev, "command_stop", False)
        if self.signum is not None and callable(prev) and not ours:
            signal.raise_signal(self.signum)


@dataclass
class StepOptions:
    """How the step runs.

    Args:
        precision: autocast dtype name (``crossmae.precision.PRECISIONS``); fp16 scales the loss.
        accum: micro-batches per step.
        clip_grad: max gradient norm (None = no clipping).
        max_nonfinite: consecutive non-finite losses before the run stops.
        grad_norm_every: the gradient norm is computed every N steps (for the records) and at
            every step with clipping.
        compile: ``torch.compile`` the forward module (a string: with that mode).
        cuda_graph: replay forward + backward of one micro-batch from a CUDA graph (one process,
            one micro-batch, no fp16).
        prefetch: copy the next batch's ``images`` / ``ids_shuffle`` to the GPU while this step
            runs.
        ddp_fp16_compression: all-reduce gradients in fp16.
        activation_checkpointing: recompute the backbone blocks' activations in backward
            instead of keeping them (less memory, about a third more compute).
    """

    precision: str = "fp32"
    accum: int = 1
    clip_grad: float | None = None
    max_nonfinite: int = 5
    grad_norm_every: int = 1
    compile: bool | str = False
    cuda_graph: bool = False
    prefetch: bool = False
    ddp_fp16_compression: bool = False
    activation_checkpointing: bool = False

    def check(self, device: torch.device, world: int) -> None:
        """Settings this device and process count cannot run, named (before anything runs)."""
        autocast_dtype(self.precision)
        if not self.cuda_graph:
            return
        problem = None
        if device.type != "cuda":
            problem = f"a CUDA device (this run is on {device.type})"
        elif world > 1:
            problem = (
                f"a single process (this run has {world}; DDP's gradient hooks are not captured)"
            )
        elif self.accum > 1:
            problem = f"one micro-batch per step (train.micro_batch gives {self.accum})"
        elif self.precision == "fp16":
            problem = "train.precision=bf16 or fp32 (fp16's loss scaler checks on the host)"
        if problem:
            raise ConfigError(f"train.cuda_graph=true needs {problem}")


class TrainStep(Protocol):
    """What the engine computes (a ``crossmae.task.Task`` is one)."""

    def inputs(self, batch: Any, device: torch.device) -> dict[str, Any]: ...

    def losses(self, model: nn.Module, **inputs: Any) -> dict[str, torch.Tensor]: ...


class Hook:
    """Something the loop does besides the step (detectron2's ``HookBase``): each method is
    called on every process, in the order of the engine's hook list. ``name`` keys its state in
    checkpoints."""

    name = "hook"
    # an evaluation (it may fail on its data): the engine calls it after the other hooks, so
    # that the step's checkpoint is written before it runs
    evaluation = False

    def before_train(self, engine: Engine) -> None: ...

    def after_update(self, engine: Engine) -> None:
        """After an optimizer step that was taken (not after a skipped, non-finite one)."""

    def after_step(self, engine: Engine) -> None:
        """After every step (``engine.stopping``: a stop was requested; the loop ends next)."""

    def after_epoch(self, engine: Engine) -> None: ...

    def after_train(self, engine: Engine, interrupted: bool) -> None: ...

    def write(self, record: dict, group: str) -> None:
        """A record (``engine.record``) to write, if this hook writes records."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


def prepare_model(model: nn.Module, options: StepOptions, world: int,
                  device: torch.device) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """The one place a model is wrapped for training: activation checkpointing, DDP over
    ``world`` processes (with fp16 gradient compression if asked), then ``torch.compile``.
    Returns (the DDP module, for ``no_sync``; the module a step calls)."""
    if options.activation_checkpointing and not set_activation_checkpointing(model):
        raise ConfigError("train.activation_checkpointing=true: this task's model has no "
                          "backbone that supports it")  # fmt: skip
    ddp = model
    if world > 1:
        ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
        if options.ddp_fp16_compression:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                fp16_compress_hook,
            )

            ddp.register_comm_hook(None, fp16_compress_hook)
    mode = options.compile if isinstance(options.compile, str) else None
    return ddp, (torch.compile(ddp, mode=mode) if options.compile else ddp)


class Engine:
    """The training loop (module docstring).

    Args:
        model: the model (unwrapped: the engine adds DDP and ``torch.compile``).
        optimizer: its optimizer; each group's lr is ``schedule(step) * group["lr_scale"]``.
        loader: the training batches, a loader over a ``ResumableSampler`` (None: the caller
            feeds ``train_step`` itself, as the benchmark does).
        schedule: the lr of a step.
        task: what a step computes: ``inputs(batch, device)`` and ``losses(model, **inputs)``.
        steps: the step at which training stops.
        device: this process's device.
        options: how the step runs (``StepOptions``).
        hooks: called after each update, step and epoch, in order, evaluations
            (``Hook.evaluation``) after the others: a step's checkpoint is written before any
            evaluation at that step can fail.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader | None,
        schedule: Callable[[int], float],
        task: TrainStep,
        *,
        steps: int,
        device: torch.device,
        options: StepOptions | None = None,
        hooks: Sequence[Hook] = (),
    ):
        if isinstance(loader, DataLoader) and loader.generator is None:
            raise ValueError(
                "the training loader needs its own generator (DataLoader(..., "
                "generator=torch.Generator()), as make_loader gives it): starting an epoch must "
                "not draw from the global random stream, or a resumed run would differ"
            )
        self.model, self.optimizer, self.loader, self.schedule = model, optimizer, loader, schedule
        self.task, self.steps, self.device = task, steps, device
        self.options = options = options or StepOptions()
        self.hooks = sorted(hooks, key=lambda h: h.evaluation)  # evaluations last, stable
        self.amp = autocast_dtype(options.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.precision == "fp16")
        self.rank, self.world = du.rank(), du.world_size()
        sampler = getattr(loader, "sampler", None)
        self.sampler = sampler if isinstance(sampler, ResumableSampler) else None
        self.steps_per_epoch = self.sampler.steps_per_epoch if self.sampler is not None else 1
        self.step = 0
        # what the last step left for the hooks
        self.lr = 0.0
        self.last_parts: dict[str, torch.Tensor] = {}  # its loss parts (means over micro-batches)
        self.taken = True  # whether its update was applied (False: a non-finite loss)
        self.grad_norm: torch.Tensor | None = None  # when computed (``grad_norm_every``)
        self.data_time = 0.0  # seconds spent waiting for its batches
        self.stopping = False  # a stop signal reached some process
        self.wrapped: nn.Module = model  # DDP / compiled: set by prepare()
        self.ddp: nn.Module = model
        self.graphed = None  # the CUDA graph, captured on the first micro-batch
        self.stop = StopRequest()
        self.nonfinite_run = 0

    # ------------------------------------------------------------------ state
    def state_dict(self, training_state: bool = True) -> dict[str, Any]:
        """The model, position and hooks' state (``training_state``: also the optimizer and
        scaler). The random streams are the caller's to gather (every process has its own)."""
        state = {"model": self.model.state_dict(), "step": self.step,
                 "epoch": self.step // self.steps_per_epoch,
                 "steps_per_epoch": self.steps_per_epoch,
                 "hooks": {h.name: h.state_dict() for h in self.hooks}}  # fmt: skip
        if training_state:
            state.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict())
        return state

    def load_state_dict(self, ckpt: dict, *, what: str, seed: int = 0) -> None:
        """Restore a checkpoint written from ``state_dict`` (``what`` names it in errors) and this
        process's random streams; on another number of processes than at save time, the streams
        are reseeded from ``seed``."""
        spe = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        if spe != self.steps_per_epoch:
            raise ConfigError(
                f"{what} was written with {spe} steps per epoch, this run has "
                f"{self.steps_per_epoch}: resume with the same data and batch size"
            )
        load_state_dict_strict(self.model, ckpt["model"], what=what)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        for h in self.hooks:
            h.load_state_dict(ckpt.get("hooks", {}).get(h.name, {}))
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.world:  # each process continues its own random streams
            restore_random_states(rngs[self.rank])
        else:
            torch.manual_seed(seed + self.rank + self.step)
            log.warning("%d processes now, %d at save: random streams reseeded", self.world,
                        len(rngs))  # fmt: skip

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters()
                   if p.is_floating_point())  # fmt: skip

    def gather_random_states(self) -> list[dict]:
        """Every process's random streams (every process joins)."""
        return du.all_gather_objects(random_states())

    def record(self, record: dict, group: str = "train") -> None:
        """Hand a record (a dict with ``"step"``) to the hooks that write records."""
        for h in self.hooks:
            h.write(record, group)

    # ------------------------------------------------------------------ the step
    def prepare(self) -> None:
        """Wrap the model for the loop (``prepare_model``)."""
        self.ddp, self.wrapped = prepare_model(self.model, self.options, self.world, self.device)

    def _losses(self, inputs: dict) -> dict[str, torch.Tensor]:
        # autocast's weight cache is off under CUDA-graph capture
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=not self.options.cuda_graph):  # fmt: skip
            return self.task.losses(self.wrapped, **inputs)

    def _graph_loss(self, **inputs) -> torch.Tensor:
        return self._losses(inputs)["loss"]

    def forward_backward(self, batches: Iterator) -> dict[str, torch.Tensor]:
        """``accum`` micro-batches of ``batches`` forward and backward; returns the step's loss
        parts (means over the micro-batches, detached)."""
        from .cuda_graph import GraphedStep

        accum = self.options.accum
        parts: dict[str, torch.Tensor] = {}
        self.data_time = 0.0
        for k in range(accum):
            t0 = time.perf_counter()
            inputs = self.task.inputs(next(batches), self.device)
            self.data_time += time.perf_counter() - t0
            if self.options.cuda_graph:  # one process, one micro-batch
                if self.graphed is None:
                    self.graphed = GraphedStep(self._graph_loss, self.model.parameters(), **inputs)
                out = {"loss": self.graphed(**inputs)}
            else:
                no_sync = self.world > 1 and k < accum - 1
                with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                    out = self._losses(inputs)
                    self.scaler.scale(out["loss"] / accum).backward()
            for name, v in out.items():
                parts[name] = parts.get(name, 0.0) + v.detach().float() / accum
        return parts

    def train_step(self, batches: Iterator) -> None:
        """One optimizer step on ``batches``: sets ``lr``, ``last_parts``, ``taken``,
        ``grad_norm``, ``stopping`` and advances ``step``."""
        o = self.options
        # schedule
        self.lr = lr = self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        # forward + backward
        parts = self.last_parts = self.forward_backward(batches)
        nonfinite, self.stopping = self.stop.agree(parts["loss"])
        self.taken, self.grad_norm = not nonfinite, None
        if nonfinite:
            self._skip_step()
        else:
            # step: unscale + clip (or only measure the norm on recording steps), update
            self.nonfinite_run = 0
            next_step = self.step + 1
            if (
                o.clip_grad is not None
                or next_step % o.grad_norm_every == 0
                or next_step == self.steps
            ):
                self.scaler.unscale_(self.optimizer)
                self.grad_norm = nn.utils.clip_grad_norm_(
                    self.model.parameters(), o.clip_grad or math.inf
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.graphed is None:
                self.optimizer.zero_grad(set_to_none=True)
            for h in self.hooks:
                h.after_update(self)
        self.step += 1

    def _skip_step(self) -> None:
        """A non-finite loss: no update; ``max_nonfinite`` in a row stop the run."""
        if self.graphed is None:  # a replay overwrites the graph's gradients
            self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_run += 1
        log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step + 1,
                    self.nonfinite_run)  # fmt: skip
        if self.nonfinite_run >= self.options.max_nonfinite:
            raise FloatingPointError(
                f"the loss was non-finite for {self.nonfinite_run} steps in a row (last at step "
                f"{self.step + 1}); lower the learning rate, set optim.clip_grad, or use "
                "train.precision=bf16/fp32"
            )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator:
        self.sampler.set_epoch(epoch, start)
        batches = iter(self.loader)
        if self.options.prefetch and self.device.type == "cuda":
            batches = CudaPrefetcher(batches, self.device)  # copies overlap the previous step
        return batches

    # ------------------------------------------------------------------ the loop
    def run(self, finish: Callable[[bool], bool] | None = None) -> bool:
        """The whole training and its end: ``train()``, then ``finish(interrupted)`` (the
        caller's end of a run: final checkpoint and evaluation; it returns whether the run ended
        early, which ``after_train`` hooks are told), then every hook's ``after_train``; every
        hook is closed after, also when any of these fails, and so is the loader (its
        persistent workers stop). Returns whether a stop signal ended the loop."""
        try:
            interrupted = self.train()
            ended = finish(interrupted) if finish is not None else interrupted
            for h in self.hooks:
                h.after_train(self, ended)
            return interrupted
        finally:
            if hasattr(self.loader, "close"):
                self.loader.close()
            for h in self.hooks:
                h.close()

    def train(self) -> bool:
        """Train from the current step to ``steps``; returns whether a stop signal ended it."""
        self.prepare()
        self.model.train()
        for h in self.hooks:
            h.before_train(self)
        with self.stop:
            while self.step < self.steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                batches = self._epoch_batches(epoch, start)
                for _ in range(start, self.steps_per_epoch):
                    self.train_step(batches)
                    for h in self.hooks:
                        h.after_step(self)
                    if self.stopping:
                        return True
                    if self.step >= self.steps:
                        break
                if self.step % self.steps_per_epoch:
                    break  # stopped mid-epoch at ``steps``
                for h in self.hooks:
                    h.after_epoch(self)
        return False


def plan_batches(global_batch: int, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(per-process micro batch, accumulation steps) that make up ``global_batch``."""
    if global_batch % world:
        raise ConfigError(f"train.batch_size={global_batch} is not divisible by {world} processes")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if micro <= 0 or per_rank % micro:
        raise ConfigError(
            f"train.micro_batch={micro} does not divide the per-process batch {per_rank} "
            f"(batch_size {global_batch} / {world} processes)"
        )
    return micro, per_rank // micro


def step_options(task: TrainStep, cfg, accum: int) -> StepOptions:
    """The engine's options: the shared settings (of a config's ``train`` and ``optim``
    sections), then the task's own (``engine_options()``)."""
    return StepOptions(precision=cfg.train.precision, accum=accum, clip_grad=cfg.optim.clip_grad,
                       max_nonfinite=cfg.train.max_nonfinite_steps,
                       grad_norm_every=cfg.log.every_steps,
                       activation_checkpointing=cfg.train.activation_checkpointing,
                       **task.engine_options())  # fmt: skip
