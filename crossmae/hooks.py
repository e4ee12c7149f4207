"""The loop hooks every run has (``crossmae.runner`` adds them, the task's own in between):

- ``MetricsWriter``: every ``every_steps`` steps one ``metrics.jsonl`` record with the means since
  the last record (losses, throughput, gradient norm), TensorBoard and a progress bar (rank 0);
- ``EvalHook``: the task's evaluation every N steps and / or epochs, recorded and logged, the best
  one kept as ``checkpoint-best.pt``;
- ``CheckpointHook``: ``checkpoint-last.pt`` every N steps and / or epochs and when a stop signal
  arrives, holding the model, optimizer, scaler, position, the hooks' state, the task's fields and
  every process's random streams; every N epochs and at the last one, the task's exports are kept
  under the epoch's name (pretraining: ``encoder-epochN.pt``), or ``checkpoint-epochN.pt`` for a
  task without exports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed as du
from .checkpoint import LAST, save_atomic, strict_json, write_text_atomic
from .engine import Engine, Hook
from .evaluation import Evaluation
from .progress import duration

log = logging.getLogger("crossmae")


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


@dataclass
class _Window:
    """Sums since the last record."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    good: int = 0  # steps taken (non-finite ones are skipped, not averaged)
    steps: int = 0
    data_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


class MetricsWriter(Hook):
    """Training records, TensorBoard and the progress bar (module docstring).

    Args:
        out: the run folder (``metrics.jsonl``, ``tb/``).
        images_per_step: the global batch (for img/s).
        every_steps: record interval.
        tensorboard, progress: TensorBoard events and a progress bar (rank 0).
        extra: fields added to every training record.
    """

    name = "metrics"

    def __init__(self, out: Path, *, images_per_step: int, every_steps: int,
                 tensorboard: bool = False, progress: bool = False,
                 extra: Callable[[], dict] = dict):  # fmt: skip
        self.out, self.images_per_step, self.every_steps = Path(out), images_per_step, every_steps
        self.tensorboard, self.progress, self.extra = tensorboard, progress, extra
        self.last_record: dict = {}  # the latest training record (every process has it)
        self.window = _Window()
        self._grad_norm: torch.Tensor | None = None
        self._file = self._writer = self._bar = None
        self._timed: tuple[int, float] | None = None

    def before_train(self, engine: Engine) -> None:
        self.window = _Window()
        self._timed = None  # (step, time) at the end of the first step: later steps give the ETA
        if engine.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.out / "metrics.jsonl", engine.step)
        self._file = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.out / "tb", purge_step=engine.step)
        if self.progress and sys.stderr.isatty():  # elsewhere (a file, Slurm) the log lines
            from tqdm import tqdm

            self._bar = tqdm(total=engine.steps, initial=engine.step, unit="step",
                             dynamic_ncols=True)  # fmt: skip

    def after_step(self, engine: Engine) -> None:
        w = self.window
        w.steps += 1
        w.data_s += engine.data_time
        if engine.taken:
            for name, v in engine.last_parts.items():
                w.sums[name] = w.sums.get(name, 0.0) + v
            w.good += 1
        if engine.grad_norm is not None:
            self._grad_norm = engine.grad_norm
        s = engine.step
        if self._timed is None:  # the first step compiles, warms up: not timed
            self._timed = (s, time.perf_counter())
        recorded = s % self.every_steps == 0 or s == engine.steps or engine.stopping
        if recorded:
            self.record_window(engine)
        elif s == self._timed[0] + 3 and engine.rank == 0:  # an early rate, before any record
            log.info("step %d/%d: %s", s, engine.steps, self.pace(engine))
        if self._bar is not None:
            self._bar.update(1)

    def pace(self, engine: Engine) -> str:
        """The rate since the first step and the time the remaining steps will take at it."""
        step0, t0 = self._timed or (engine.step, time.perf_counter())
        done, dt = engine.step - step0, time.perf_counter() - t0
        if done <= 0:
            return "timing from the next step"
        per_step = dt / done
        return (f"{per_step:.3g} s/step, {self.images_per_step / per_step:.3g} img/s, "
                f"ETA {duration((engine.steps - engine.step) * per_step)}")  # fmt: skip

    def record_window(self, engine: Engine) -> dict:
        """One record of the means since the last one (every process joins)."""
        w = self.window
        names = sorted(w.sums)
        means = torch.stack([w.sums[n] for n in names]) / max(w.good, 1) if names else None
        values = du.all_reduce_mean(means).tolist() if means is not None else []
        dt = time.perf_counter() - w.t0
        rec = {"step": engine.step, "epoch": engine.step / engine.steps_per_epoch,
               "lr": engine.lr, **dict(zip(names, values, strict=True)),
               "img_per_s": w.steps * self.images_per_step / dt, "step_time_s": dt / w.steps,
               "data_time_s": w.data_s / w.steps}  # fmt: skip
        if w.good < w.steps:  # non-finite steps are skipped: not in the means
            rec["skipped_steps"] = w.steps - w.good
        if w.good == 0:
            rec["loss"] = float("nan")
        if self._grad_norm is not None:
            rec["grad_norm"] = float(self._grad_norm)
            self._grad_norm = None
        if engine.device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
        rec.update(self.extra())
        engine.record(rec)
        self.last_record = rec
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{engine.lr:.2e}",
                                  img_s=f"{rec['img_per_s']:.3g}")  # fmt: skip
        if engine.rank == 0:
            log.info("step %d/%d (%.0f%%): loss %.4g, lr %.3g | %s", engine.step, engine.steps,
                     100 * engine.step / engine.steps, rec["loss"], engine.lr,
                     self.pace(engine))  # fmt: skip
        self.window = _Window()
        return rec

    def write(self, record: dict, group: str) -> None:
        if self._file is not None:
            self._file.write(strict_json(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(f"{group}/{key}", value, record["step"])

    def state_dict(self) -> dict:
        return {"last_record": self.last_record}

    def load_state_dict(self, state: dict) -> None:
        self.last_record = state.get("last_record") or {}

    def close(self) -> None:
        for f in (self._bar, self._file, self._writer):
            if f is not None:
                f.close()
        self._bar = self._file = self._writer = None


# how a stopped run is continued, as the stop message says it: a command that runs training in
# its own process (crossmae ablate) pushes its own way while it runs (``resume_hint``)
RESUME_HINT = ["--resume auto"]


@contextlib.contextmanager
def resume_hint(text: str):
    """While in the block, a stopped run says "continue with ``text``"."""
    RESUME_HINT.append(text)
    try:
        yield
    finally:
        RESUME_HINT.pop()


class CheckpointHook(Hook):
    """``checkpoint-last.pt`` at its intervals and at a stop signal (module docstring).

    Args:
        out: the run folder.
        fields: what every checkpoint holds besides the engine's state (format, config, the
            task's fields).
        every_steps, every_epochs: intervals (0 = never).
        keep_every_epochs: every N epochs and at the run's last epoch (0 = never), keep each of
            the task's exports as ``NAME-epochN.pt`` (``encoder-epochN.pt``: what an evaluation
            reads, a fraction of a checkpoint), or ``checkpoint-epochN.pt`` without exports.
        exports: files written beside every ``checkpoint-last.pt`` whose last step was finite
            (name -> contents; the task's ``exports``).
    """

    name = "checkpoint"

    def __init__(self, out: Path, fields: Callable[[], dict], *, every_steps: int = 0,
                 every_epochs: int = 0, keep_every_epochs: int = 0,
                 exports: Callable[[int], dict[str, dict]] = lambda step: {}):  # fmt: skip
        self.out, self.fields, self.exports = Path(out), fields, exports
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.keep_every_epochs = keep_every_epochs
        self.saved_at = -1  # the step of the last checkpoint-last.pt
        self.has_exports: bool | None = None  # known at the first kept epoch

    def save(self, engine: Engine, tag: str = LAST, *, training_state: bool = True) -> bool:
        """Write ``out/tag`` atomically (every process joins: each one's random streams are
        gathered). ``training_state=False`` leaves out the optimizer and scaler. Weights that
        are not finite are not written over the previous file (returns False)."""
        if not engine.weights_finite():  # every process has the same weights
            kept = "the previous one is kept" if (self.out / tag).exists() else "none written yet"
            log.warning("step %d: non-finite weights, %s not written (%s)", engine.step, tag,
                        kept)  # fmt: skip
            return False
        rngs = engine.gather_random_states()
        if tag == LAST:
            self.saved_at = engine.step
        if engine.rank == 0:
            state = {**self.fields(), **engine.state_dict(training_state), "rng": rngs}
            save_atomic(state, self.out / tag)
            if tag == LAST and engine.taken:
                for name, contents in self.exports(engine.step).items():
                    save_atomic(contents, self.out / name)
        return True

    def save_if_stale(self, engine: Engine) -> None:
        if self.saved_at != engine.step:
            self.save(engine)

    def after_step(self, engine: Engine) -> None:
        if engine.stopping:
            by = engine.stop.signum
            name = signal.Signals(by).name if by else "from another process"
            if self.save(engine):
                log.warning("signal %s: checkpoint written at step %d; continue with %s", name,
                            engine.step, RESUME_HINT[-1])  # fmt: skip
            else:
                log.warning("signal %s: stopped at step %d; continue with %s from the last "
                            "checkpoint", name, engine.step, RESUME_HINT[-1])  # fmt: skip
        elif self.every_steps and engine.step % self.every_steps == 0:
            self.save(engine)

    def after_epoch(self, engine: Engine) -> None:
        done = engine.step // engine.steps_per_epoch
        if self.every_epochs and done % self.every_epochs == 0:
            self.save(engine)
        last = engine.step >= engine.steps
        if self.keep_every_epochs and (done % self.keep_every_epochs == 0 or last):
            self.keep(engine, done)

    def after_train(self, engine: Engine, interrupted: bool) -> None:
        """A run that ends mid-epoch (``train.steps``, ``max_steps``) keeps its last state too,
        as the epoch it is in (the file says its step)."""
        if not interrupted and self.keep_every_epochs and engine.step % engine.steps_per_epoch:
            self.keep(engine, math.ceil(engine.step / engine.steps_per_epoch))

    def keep(self, engine: Engine, epoch: int) -> None:
        """``NAME-epochN.pt`` of each export (weights that are not finite are not kept), or the
        whole checkpoint without its optimizer when the task has no exports."""
        if self.has_exports is None:  # the same answer on every process
            self.has_exports = bool(self.exports(engine.step))
        if not self.has_exports:
            self.save(engine, f"checkpoint-epoch{epoch}.pt", training_state=False)
        elif not engine.weights_finite():
            log.warning("epoch %d: non-finite weights, not kept", epoch)
        elif engine.rank == 0:
            for name, contents in self.exports(engine.step).items():
                stem, dot, ext = name.rpartition(".")
                path = self.out / f"{stem}-epoch{epoch}{dot}{ext}"
                save_atomic({**contents, "epoch": epoch}, path)


def evaluation_failed(engine: Engine, what: str, error: Exception, stop: bool) -> None:
    """An evaluation inside training failed (``what``: its name in the log): with ``stop``
    (``train.stop_on_eval_error``) the run ends with the error, the step's checkpoint being
    written already (evaluations run after the checkpoint hook); otherwise one error line, an
    ``evaluation_error`` record, and training goes on. A failure that not every process saw
    (anything but an ``EvaluationError`` under torch.distributed) always ends the run."""
    from .evaluation import EvaluationError

    if stop or (engine.world > 1 and not isinstance(error, EvaluationError)):
        raise error
    message = f"{type(error).__name__}: {error}" if not isinstance(error, EvaluationError) else (
        str(error))  # fmt: skip
    log.error("step %d: %s failed, training goes on (train.stop_on_eval_error=true would end "
              "the run): %s", engine.step, what, message)  # fmt: skip
    engine.record({"step": engine.step, "evaluation_error": f"{what}: {message}"}, "errors")


class EvalHook(Hook):
    """A task's evaluation (``crossmae.evaluation.Evaluation``) at its intervals (every process
    joins), recorded under its ``group`` and logged; with a ``best`` metric, the best evaluation
    so far is kept (``best``) and written as ``checkpoint-best.pt`` (no optimizer state).

    Args:
        evaluation: what to run, how often, how to log and keep it (None: the task has no
            evaluation; the hook does nothing).
        saver: the checkpoint hook that writes ``checkpoint-best.pt``.
        out: the run folder, where the curve of the evaluations is drawn (None: not drawn).
        stop_on_error: a failing evaluation ends the run (else it is logged and recorded).
    """

    name = "evaluation"
    evaluation = True

    def __init__(self, evaluation: Evaluation | None, *, saver: CheckpointHook | None = None,
                 out: Path | None = None, stop_on_error: bool = False):  # fmt: skip
        self.spec, self.saver, self.out, self.stop_on_error = evaluation, saver, out, stop_on_error
        every = (evaluation.every_steps, evaluation.every_epochs) if evaluation else (0, 0)
        self.every_steps, self.every_epochs = every
        self.evaluated_at = -1
        self.metrics: dict | None = None  # the latest evaluation
        self.best: dict | None = None  # the best, with its epoch

    def evaluate(self, engine: Engine) -> dict | None:
        """The evaluation, recorded and logged; the checkpoint written at this step (before the
        evaluation) is written again, with the evaluation's state. A failure is
        ``evaluation_failed``'s."""
        spec = self.spec
        try:
            metrics = spec.run(engine.step)
        except Exception as e:  # noqa: BLE001 - evaluation_failed re-raises what it cannot keep
            evaluation_failed(engine, "the evaluation", e, self.stop_on_error)
            self.evaluated_at = engine.step
            return None
        self.metrics, self.evaluated_at = metrics, engine.step
        epoch = engine.step / engine.steps_per_epoch
        engine.record({"step": engine.step, "epoch": epoch, **_scalars(metrics, spec.prefix)},
                      spec.group)  # fmt: skip
        key = spec.best
        if key is not None and (self.best is None or metrics[key] > self.best[key]):
            self.best = {**metrics, "epoch": math.floor(epoch)}
            if self.saver is not None:
                self.saver.save(engine, "checkpoint-best.pt", training_state=False)
        best = f" (best {key} {self.best[key]:.4g})" if key is not None else ""
        log.info("step %d (epoch %g): %s%s", engine.step, epoch, spec.line(metrics), best)
        if spec.tables is not None and (tables := spec.tables(metrics)):
            log.info("%s", tables)
        self.draw(engine)
        if self.saver is not None and self.saver.saved_at == engine.step:
            self.saver.save(engine)  # the checkpoint of this step, now with this evaluation
        return metrics

    def draw(self, engine: Engine) -> None:
        """The evaluations so far as a table and a curve in the run folder (rank 0)."""
        curve = self.spec.curve_keys()
        if self.out is None or engine.rank != 0 or not curve:
            return
        from .visualize import save_evaluation_curve

        save_evaluation_curve(self.out / "metrics.jsonl", self.out, curve)

    def evaluate_if_stale(self, engine: Engine) -> bool:
        """Evaluate unless this step was evaluated (or there is no evaluation); returns whether
        it evaluated."""
        if self.spec is None or self.evaluated_at == engine.step:
            return False
        self.evaluate(engine)
        return True

    def after_step(self, engine: Engine) -> None:
        if not engine.stopping and self.every_steps and engine.step % self.every_steps == 0:
            self.evaluate_if_stale(engine)

    def after_epoch(self, engine: Engine) -> None:
        done = engine.step // engine.steps_per_epoch
        if self.every_epochs and done % self.every_epochs == 0:
            self.evaluate_if_stale(engine)

    def state_dict(self) -> dict:
        return {"evaluated_at": self.evaluated_at, "metrics": self.metrics, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.evaluated_at = state.get("evaluated_at", -1)
        self.metrics, self.best = state.get("metrics"), state.get("best")


def _scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) metrics dict, flat: ``{"bbox": {"AP": ..}}`` -> ``bbox/AP``;
    without the per-class tables (``per_class``: in results.json, not in every record)."""
    out = {}
    for k, v in metrics.items():
        if k == "per_class":
            continue
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


class TqdmHandler(logging.Handler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)
