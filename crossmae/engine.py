"""The training engine: the one loop that pretraining, finetuning, the linear probe, detection and
segmentation run on.

A task supplies its model, optimizer, data and two functions (``inputs``: a loader batch -> the
device tensors of one micro-batch; ``losses``: the forward module and those tensors -> a dict with
the total ``"loss"`` and any parts to log) plus optional ``Hooks``; the engine does the rest:

- the step: the lr of ``lr_at(step)`` (times each parameter group's ``lr_scale``), micro-batches
  under autocast with DDP's gradient sync on the last only, the loss scaler, a step skipped on a
  non-finite loss (every process agrees; ``max_nonfinite`` in a row stop the run), gradient
  clipping, and optionally ``torch.compile`` and a CUDA-graph replay of forward + backward;
- logging: every ``log_every`` steps one ``metrics.jsonl`` record with the means since the last
  record (losses, throughput, gradient norm), TensorBoard and a progress bar;
- checkpoints: ``checkpoint-last.pt`` every ``ckpt_every`` steps and/or epochs, holding the model,
  optimizer, scaler, position and every process's random streams (torch CPU, each CUDA device,
  numpy, Python), so that a resumed run repeats the uninterrupted one;
- SIGTERM / SIGUSR1 / SIGUSR2: the step finishes, a checkpoint is written, the run returns
  ``interrupted`` and the signal is passed on to a previous handler (submitit's requeue);
- evaluation every ``eval_every`` steps and/or epochs and at the end.

The per-process sampler (``ResumableSampler``) makes the batch order a function of the epoch, so a
run resumed at step s reads the same batches as the uninterrupted one from step s on.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, default_collate

from . import distributed as du
from .checkpoint import (
    LAST,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_strict,
    random_states,
    restore_random_states,
    save_atomic,
    write_text_atomic,
)
from .config import ConfigError
from .data import CudaPrefetcher, ResumableSampler, make_loader

log = logging.getLogger("crossmae")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
# settings a run may change when it resumes: how it logs, where it runs, how fast it goes
RESUMABLE_CHANGES = ("log.", "eval.", "output_dir", "data.num_workers", "train.device",
                     "train.max_steps", "train.resume_with_changes", "train.micro_batch",
                     "train.compile", "train.cuda_graph", "train.sdpa",
                     "train.activation_memory_budget")  # fmt: skip


# ----------------------------------------------------------------------------- run folder
class StopRequest:
    """Records SIGTERM / SIGUSR1 / SIGUSR2 so the loop can checkpoint at the next step boundary.
    On exit, the previous handlers come back; ``forward()`` then re-raises the signal to a
    previous Python handler (e.g. submitit's, which requeues the job)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for s in STOP_SIGNALS:
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

    def forward(self) -> None:
        """Pass a received signal on to a previous Python handler (Ctrl-C's default one, which
        would only print a KeyboardInterrupt traceback, excepted)."""
        prev = self._previous.get(self.signum)
        if self.signum is not None and callable(prev) and prev is not signal.default_int_handler:
            signal.raise_signal(self.signum)


class TqdmHandler(logging.Handler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(out_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr and ``log.txt``; other ranks only warnings."""
    logger = logging.getLogger("crossmae")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [TqdmHandler()]
    if out_dir is not None and rank == 0:
        handlers.append(logging.FileHandler(out_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)


def check_precision(value: str, key: str = "train.precision") -> torch.dtype | None:
    """The autocast dtype of a precision setting (None = full precision)."""
    if value not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {sorted(PRECISIONS)}, got {value!r}")
    return PRECISIONS[value]


class RunLock:
    """``run.lock`` in a run folder, holding the host and process id of the run writing it: a
    second run into the same folder is refused while the first is alive; a lock left by a
    process that no longer exists (on this host) is taken over. Released on exit."""

    NAME = "run.lock"
    held: dict[Path, Path] = {}  # run folder -> lock file, taken by this process

    @classmethod
    def take(cls, out: Path) -> None:
        path = out / cls.NAME
        if out in cls.held:
            return
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                host, _, pid = path.read_text().strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    log.warning("%s: taking over the lock of process %s, which has ended", out,
                                pid)  # fmt: skip
                    path.unlink(missing_ok=True)
                    continue
                raise FileExistsError(
                    f"{out} is in use by process {pid} on {host} ({path}); if that run has "
                    "ended elsewhere, delete the file"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            cls.held[out] = path
            atexit.register(cls.release, out)
            return

    @classmethod
    def release(cls, out: Path) -> None:
        path = cls.held.pop(Path(out), None)
        if path is not None:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def changed_settings(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every setting that differs, less ``RESUMABLE_CHANGES``."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    keys = sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))  # fmt: skip
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys]


def open_run(cfg: DictConfig, resume: str | None, out: str | Path) -> torch.device:
    """The opening of every run: a known precision, this process's device (joining torchrun's
    group), an output folder that does not already hold a run unless resuming, the resolved
    ``config.yaml`` in it, and logging. Returns the device."""
    check_precision(cfg.train.precision)
    device = du.init_from_env(cfg.train.device)
    out = Path(out)
    if resume is None and latest_checkpoint(out) is not None:
        raise FileExistsError(
            f"{out} already holds a run; continue it with --resume auto or choose another "
            "output_dir"
        )
    if du.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        RunLock.take(out)
        if resume is None or (resume == "auto" and latest_checkpoint(out) is None):
            write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))  # a resumed run's
            # config.yaml is written once its checkpoint has accepted the settings
    du.barrier()
    setup_logging(out, du.rank())
    return device


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


def task_loader(
    dataset: Dataset, cfg: DictConfig, device: torch.device, collate_fn=None
) -> tuple[ResumableSampler, DataLoader, int]:
    """The resumable sampler and loader of a task's training set (``cfg.train.batch_size`` /
    ``micro_batch`` / ``seed``, ``cfg.data.num_workers``); returns them and the accumulation
    steps."""
    world = du.world_size()
    micro, accum = plan_batches(cfg.train.batch_size, world, cfg.train.micro_batch)
    sampler = ResumableSampler(len(dataset), per_rank_step=micro * accum, num_replicas=world,
                               rank=du.rank(), seed=cfg.train.seed)  # fmt: skip
    loader = make_loader(dataset, sampler, micro, cfg.data.num_workers, device.type == "cuda",
                         collate_fn or default_collate)  # fmt: skip
    return sampler, loader, accum


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["step"] <= last_step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- the engine
@dataclass
class Hooks:
    """What a task adds to the loop (every one optional).

    - ``evaluate(step)``: the task's metrics (every process joins); recorded by the caller;
    - ``after_update(step)``: after each optimizer step that was taken (e.g. an EMA update);
    - ``after_epoch(epoch)``: at the end of each full epoch, before its checkpoint;
    - ``checkpoint_fields()``: what every checkpoint holds besides the training state (format,
      config, ...);
    - ``record_fields()``: extra fields of each training record.
    """

    evaluate: Callable[[int], dict] | None = None
    after_update: Callable[[int], None] | None = None
    after_epoch: Callable[[int], None] | None = None
    checkpoint_fields: Callable[[], dict] = dict
    record_fields: Callable[[], dict] = dict


@dataclass
class _Window:
    """Sums since the last record."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    good: int = 0  # steps taken (non-finite ones are skipped, not averaged)
    steps: int = 0
    data_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


class Engine:
    """The training loop (module docstring). Build it, ``resume(...)``, ``train()``, wrap up,
    ``finish()``.

    Args:
        model: the model (unwrapped: the engine adds DDP and ``torch.compile``).
        optimizer: its optimizer; each group's lr is ``lr_at(step) * group["lr_scale"]``.
        out: the run folder.
        device: this process's device.
        sampler, loader: the training data (``ResumableSampler`` and a loader over it).
        steps: the step at which training stops.
        lr_at: the learning rate of a step.
        inputs: a loader batch -> the keyword tensors of ``losses`` (on the device).
        losses: ``losses(forward, **inputs)`` -> {"loss": total, part: value, ...}, where
            ``forward`` is the DDP / compiled module to call.
        accum: micro-batches per step; ``batch_size``: images per step over all processes.
        precision: autocast dtype name (``PRECISIONS``); fp16 scales the loss.
        clip_grad: max gradient norm (None = no clipping; the norm is logged anyway).
        max_nonfinite: consecutive non-finite losses before the run stops.
        log_every, ckpt_every, ckpt_every_epochs, keep_every_epochs, eval_every,
            eval_every_epochs: intervals in steps / epochs (0 = never; ``keep``: also keep
            ``checkpoint-epochN.pt``).
        compile: ``torch.compile`` the forward module (a string: with that mode);
            ``cuda_graph``: replay forward + backward of one micro-batch from a CUDA graph (one
            process, one micro-batch, no fp16);
            ``prefetch``: copy the next batch's ``images`` / ``ids_shuffle`` to the GPU while
            this one runs; ``ddp_fp16_compression``: all-reduce gradients in fp16.
        tensorboard, progress: TensorBoard events in ``out/tb`` and a progress bar (rank 0).
        seed: reseeds the streams when a run resumes on another number of processes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        out: str | Path,
        device: torch.device,
        sampler: ResumableSampler | None,
        loader,
        steps: int,
        lr_at: Callable[[int], float],
        inputs: Callable[[Any], dict[str, Any]],
        losses: Callable[..., dict[str, torch.Tensor]],
        hooks: Hooks | None = None,
        accum: int = 1,
        batch_size: int = 1,
        precision: str = "fp32",
        clip_grad: float | None = None,
        max_nonfinite: int = 5,
        log_every: int = 10,
        ckpt_every: int = 0,
        ckpt_every_epochs: int = 0,
        keep_every_epochs: int = 0,
        eval_every: int = 0,
        eval_every_epochs: int = 0,
        compile: bool | str = False,
        cuda_graph: bool = False,
        prefetch: bool = False,
        ddp_fp16_compression: bool = False,
        tensorboard: bool = False,
        progress: bool = False,
        seed: int = 0,
    ):
        self.model, self.optimizer, self.out, self.device = model, optimizer, Path(out), device
        self.sampler, self.loader, self.steps, self.lr_at = sampler, loader, steps, lr_at
        self.inputs, self.losses, self.hooks = inputs, losses, hooks or Hooks()
        self.accum, self.batch_size, self.clip_grad = accum, batch_size, clip_grad
        self.amp = check_precision(precision)
        self.max_nonfinite, self.log_every, self.ckpt_every = max_nonfinite, log_every, ckpt_every
        self.ckpt_every_epochs, self.keep_every_epochs = ckpt_every_epochs, keep_every_epochs
        self.eval_every, self.eval_every_epochs = eval_every, eval_every_epochs
        self.compile, self.cuda_graph, self.prefetch = compile, cuda_graph, prefetch
        self.ddp_fp16_compression = ddp_fp16_compression
        self.tensorboard, self.progress_bar, self.seed = tensorboard, progress, seed
        if isinstance(loader, DataLoader) and loader.generator is None:
            raise ValueError(
                "the training loader needs its own generator (DataLoader(..., "
                "generator=torch.Generator()), as make_loader gives it): starting an epoch must "
                "not draw from the global random stream, or a resumed run would differ"
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.rank, self.world = du.rank(), du.world_size()
        self.last_record: dict = {}  # the latest training record (every process has it)
        self.steps_per_epoch = sampler.steps_per_epoch if sampler is not None else 1
        self.step = 0
        self.metrics: dict | None = None  # the latest evaluation
        self.forward: nn.Module = model  # DDP / compiled: set by prepare()
        self.graphed = None  # the CUDA graph, captured on the first micro-batch
        self.stop = StopRequest()
        self.nonfinite_run = 0
        self.window = _Window()
        self._saved_at = self._evaluated_at = -1
        self._metrics_file = self._writer = self._progress = None

    # ------------------------------------------------------------------ checkpoints
    def save(self, tag: str = LAST, *, training_state: bool = True) -> None:
        """Write ``out/tag`` atomically (every process joins: each one's random streams are
        gathered). ``training_state=False`` leaves out the optimizer and scaler."""
        rngs = du.all_gather_objects(random_states())
        if tag == LAST:
            self._saved_at = self.step
        if self.rank != 0:
            return
        state = {**self.hooks.checkpoint_fields(), "model": self.model.state_dict(),
                 "step": self.step, "epoch": self.step // self.steps_per_epoch,
                 "steps_per_epoch": self.steps_per_epoch, "rng": rngs,
                 "metrics": self.metrics, "evaluated_at": self._evaluated_at,
                 "last_record": self.last_record}  # fmt: skip
        if training_state:
            state.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict())
        save_atomic(state, self.out / tag)

    def resume(self, resume: str | None) -> dict | None:
        """``"auto"`` (the run folder's last checkpoint; none: a fresh run) or a checkpoint path:
        restore the model, optimizer, scaler, position and this process's random streams.
        Returns the checkpoint (for the task's own fields) or None."""
        path = latest_checkpoint(self.out) if resume == "auto" else resume
        if not path:
            if resume == "auto":
                log.info("no checkpoint in %s: starting a fresh run", self.out)
            return None
        ck = load_checkpoint(path)
        fields = self.hooks.checkpoint_fields()
        if "format" in fields and ck.get("format") != fields["format"]:
            raise ConfigError(f"{path} is a {ck.get('format')!r} checkpoint; this run continues "
                              f"{fields['format']!r} ones")  # fmt: skip
        now = fields.get("config")
        if now is not None and ck.get("config") is not None:
            changes = changed_settings(ck["config"], now)
            if changes and not now.get("train", {}).get("resume_with_changes"):
                raise ConfigError(
                    f"{path} was trained with other settings ({'; '.join(changes)}): resume "
                    "with its settings, or add train.resume_with_changes=true to change them"
                )
            if self.rank == 0:
                write_text_atomic(self.out / "config.yaml", OmegaConf.to_yaml(now))
        load_state_dict_strict(self.model, ck["model"], what=str(path))
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        spe = ck.get("steps_per_epoch", self.steps_per_epoch)
        if spe != self.steps_per_epoch:
            raise ConfigError(
                f"{path} was written with {spe} steps per epoch, this run has "
                f"{self.steps_per_epoch}: resume with the same data and batch size"
            )
        self.step, self.metrics = ck["step"], ck.get("metrics")
        self.last_record = ck.get("last_record") or {}
        self._saved_at = self.step
        self._evaluated_at = ck.get("evaluated_at", -1)
        rngs = ck.get("rng") or []
        if len(rngs) == self.world:  # each process continues its own random streams
            restore_random_states(rngs[self.rank])
        else:
            torch.manual_seed(self.seed + self.rank + self.step)
            log.warning("%d processes now, %d at save: random streams reseeded", self.world,
                        len(rngs))  # fmt: skip
        log.info("resumed from %s at step %d (epoch %d)", path, self.step,
                 self.step // self.steps_per_epoch)  # fmt: skip
        return ck

    # ------------------------------------------------------------------ records
    def record(self, record: dict, group: str = "train") -> None:
        """One line of ``metrics.jsonl`` (rank 0) and its numbers in TensorBoard under ``group``."""
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(f"{group}/{key}", value, record["step"])

    def _log_window(self, lr: float) -> dict:
        w = self.window
        names = sorted(w.sums)
        means = torch.stack([w.sums[n] for n in names]) / max(w.good, 1) if names else None
        values = du.all_reduce_mean(means).tolist() if means is not None else []
        dt = time.perf_counter() - w.t0
        rec = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr,
               **dict(zip(names, values, strict=True)),
               "img_per_s": w.steps * self.batch_size / dt, "step_time_s": dt / w.steps,
               "data_time_s": w.data_s / w.steps}  # fmt: skip
        if w.good < w.steps:  # non-finite steps are skipped: not in the means
            rec["skipped_steps"] = w.steps - w.good
        if w.good == 0:
            rec["loss"] = float("nan")
        if self._grad_norm is not None:
            rec["grad_norm"] = float(self._grad_norm)
            self._grad_norm = None
        if self.device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rec.update(self.hooks.record_fields())
        self.record(rec)
        self.last_record = rec
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}",
                                       img_s=f"{rec['img_per_s']:.0f}")  # fmt: skip
        self.window = _Window()
        return rec

    # ------------------------------------------------------------------ the step
    def prepare(self) -> None:
        """Wrap the model for the loop: DDP on several processes, then ``torch.compile``."""
        wrapped = self.model
        if self.world > 1:
            wrapped = DDP(self.model, device_ids=[self.device] if self.device.type == "cuda"
                          else None)  # fmt: skip
            if self.ddp_fp16_compression:
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                    fp16_compress_hook,
                )

                wrapped.register_comm_hook(None, fp16_compress_hook)
        self.ddp = wrapped
        mode = self.compile if isinstance(self.compile, str) else None
        self.forward = torch.compile(wrapped, mode=mode) if self.compile else wrapped
        self._grad_norm = None

    def _losses(self, inputs: dict) -> dict[str, torch.Tensor]:
        # autocast's weight cache is off under CUDA-graph capture
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=not self.cuda_graph):  # fmt: skip
            return self.losses(self.forward, **inputs)

    def _graph_loss(self, **inputs) -> torch.Tensor:
        return self._losses(inputs)["loss"]

    def forward_backward(self, batches: Iterator) -> dict[str, torch.Tensor]:
        """``accum`` micro-batches of ``batches`` forward and backward; returns the step's loss
        parts (means over the micro-batches, detached)."""
        from .cuda_graph import GraphedStep

        parts: dict[str, torch.Tensor] = {}
        for k in range(self.accum):
            t0 = time.perf_counter()
            inputs = self.inputs(next(batches))
            self.window.data_s += time.perf_counter() - t0
            if self.cuda_graph:  # one process, one micro-batch
                if self.graphed is None:
                    self.graphed = GraphedStep(self._graph_loss, self.model.parameters(), **inputs)
                out = {"loss": self.graphed(**inputs)}
            else:
                no_sync = self.world > 1 and k < self.accum - 1
                with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                    out = self._losses(inputs)
                    self.scaler.scale(out["loss"] / self.accum).backward()
            for name, v in out.items():
                parts[name] = parts.get(name, 0.0) + v.detach().float() / self.accum
        return parts

    def train_step(self, batches: Iterator) -> tuple[float, bool]:
        """One optimizer step on ``batches``; returns (its lr, whether a stop was requested)."""
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        parts = self.last_parts = self.forward_backward(batches)
        nonfinite, stopping = self.stop.agree(parts["loss"])
        if nonfinite:
            if self.graphed is None:  # a replay overwrites the graph's gradients
                self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_run += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step,
                        self.nonfinite_run)  # fmt: skip
            if self.nonfinite_run >= self.max_nonfinite:
                last = latest_checkpoint(self.out)
                state = f"last checkpoint: {last}" if last else "no checkpoint was written yet"
                raise FloatingPointError(
                    f"the loss was non-finite for {self.nonfinite_run} steps in a row (last at "
                    f"step {self.step}); lower the learning rate, set optim.clip_grad, or use "
                    f"train.precision=bf16/fp32 ({state})"
                )
        else:
            self.nonfinite_run = 0
            logging_now = (self.step + 1) % self.log_every == 0 or self.step + 1 == self.steps
            if self.clip_grad is not None or logging_now:
                self.scaler.unscale_(self.optimizer)
                self._grad_norm = nn.utils.clip_grad_norm_(
                    self.model.parameters(), self.clip_grad or math.inf
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.graphed is None:
                self.optimizer.zero_grad(set_to_none=True)
            for name, v in parts.items():
                self.window.sums[name] = self.window.sums.get(name, 0.0) + v
            self.window.good += 1
            if self.hooks.after_update is not None:
                self.hooks.after_update(self.step)
        self.step += 1
        self.window.steps += 1
        return lr, stopping

    def _epoch_batches(self, epoch: int, start: int) -> Iterator:
        self.sampler.set_epoch(epoch, start)
        batches = iter(self.loader)
        if self.prefetch and self.device.type == "cuda":
            batches = CudaPrefetcher(batches, self.device)  # copies overlap the previous step
        return batches

    def _evaluate(self) -> None:
        if self.hooks.evaluate is not None and self._evaluated_at != self.step:
            self.metrics = self.hooks.evaluate(self.step)
            self._evaluated_at = self.step

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train from the current step to ``steps``; returns {"step", "interrupted",
        "metrics"}. A finished run ends with an evaluation and a checkpoint."""
        self.prepare()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            self._metrics_file = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(self.out / "tb", purge_step=self.step)
            if self.progress_bar:
                from tqdm import tqdm

                self._progress = tqdm(total=self.steps, initial=self.step, unit="step",
                                      dynamic_ncols=True)  # fmt: skip
        interrupted = False
        self.model.train()
        self.window = _Window()
        with self.stop:
            while self.step < self.steps and not interrupted:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                batches = self._epoch_batches(epoch, start)
                for _ in range(start, self.steps_per_epoch):
                    lr, stopping = self.train_step(batches)
                    if self.step % self.log_every == 0 or self.step == self.steps or stopping:
                        self._log_window(lr)
                    if self._progress is not None:
                        self._progress.update(1)
                    if stopping:
                        self.save()
                        by = self.stop.signum
                        log.warning("signal %s: checkpoint written at step %d; continue with "
                                    "--resume auto", signal.Signals(by).name if by
                                    else "from another process", self.step)  # fmt: skip
                        interrupted = True
                        break
                    if self.eval_every and self.step % self.eval_every == 0:
                        self._evaluate()
                    if self.ckpt_every and self.step % self.ckpt_every == 0:
                        self.save()
                    if self.step >= self.steps:
                        break
                if interrupted or self.step % self.steps_per_epoch:
                    break  # interrupted, or stopped mid-epoch at ``steps``
                done = self.step // self.steps_per_epoch
                if self.hooks.after_epoch is not None:
                    self.hooks.after_epoch(done)
                if self.eval_every_epochs and done % self.eval_every_epochs == 0:
                    self._evaluate()
                if self.ckpt_every_epochs and done % self.ckpt_every_epochs == 0:
                    self.save()
                if self.keep_every_epochs and done % self.keep_every_epochs == 0:
                    self.save(f"checkpoint-epoch{done}.pt")
        if not interrupted:  # the training is saved before a final evaluation can fail
            if self._saved_at != self.step:
                self.save()
            if self.hooks.evaluate is not None and self._evaluated_at != self.step:
                self._evaluate()
                self.save()
        return {"step": self.step, "interrupted": interrupted, "metrics": self.metrics}

    def finish(self) -> None:
        """Close the records, wait for every process, and pass a stop signal on."""
        for f in (self._progress, self._metrics_file, self._writer):
            if f is not None:
                f.close()
        self._progress = self._metrics_file = self._writer = None
        du.barrier()
        RunLock.release(self.out)
        self.stop.forward()


# ----------------------------------------------------------------------------- tasks
def task_engine(cfg: DictConfig, model: nn.Module, optimizer, *, steps: int, **kwargs) -> Engine:
    """An ``Engine`` with what every task's config shares: ``train.*`` (batch, precision, seed,
    ``max_steps``, ``max_nonfinite_steps``), ``log.*`` and ``optim.clip_grad``."""
    t, lc = cfg.train, cfg.log
    return Engine(
        model, optimizer, steps=min(steps, t.max_steps) if t.max_steps else steps,
        batch_size=t.batch_size, precision=t.precision, clip_grad=cfg.optim.clip_grad,
        max_nonfinite=t.max_nonfinite_steps, log_every=lc.every_steps,
        ckpt_every=lc.ckpt_every_steps, tensorboard=lc.tensorboard, progress=lc.progress,
        seed=t.seed, **kwargs,
    )  # fmt: skip


def finish_task(engine: Engine, out: Path, summary: Callable[[dict], dict] | None = None) -> dict:
    """Train, then (rank 0) write ``results.json`` ({"step", "interrupted", "metrics"} and what
    ``summary(result)`` adds; a stopped run's says ``interrupted``), close and pass a stop signal
    on. Returns the same dict with the output folder."""
    result = engine.train()
    result = {"output_dir": str(out), **result, **(summary(result) if summary else {})}
    if engine.rank == 0:
        write_text_atomic(out / "results.json", json.dumps(result, indent=1))
    engine.finish()
    return result
