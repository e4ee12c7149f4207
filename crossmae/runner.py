"""One runner for every task: ``run_task(task, cfg, resume)``.

It alone owns what every run shares, in this order:

1. settings and data: the device, the batch plan and the step options are checked and the task
   opens its datasets (``Task.open_data``) before anything is written;
2. the run folder: its lock (``RunLock``), the resolved ``config.yaml``, logging (``log.txt``);
3. seeding, the model (``Task.build_model``), then each process's own streams;
4. the loader over a ``ResumableSampler``, the optimizer and lr schedule of the ``optim`` section;
5. the engine with its hooks: metrics, the task's own, evaluation, checkpoints;
6. resume: a checkpoint of the task's format, trained with the same settings (those declared
   ``resumable`` excepted), restored exactly;
7. training; then the final checkpoint before the final evaluation (so a failing evaluation
   loses no training) and once more after it;
8. ``results.json``: step, whether a signal stopped the run, the metrics and what the task adds.

A task that trains nothing (its schema has no ``optim`` section: frozen features) stops after
step 3 with one run of its evaluation and its results.json; ``--resume auto`` has nothing to
continue there and evaluates again.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from . import distributed as du
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    seed_all,
    strict_json,
    write_text_atomic,
)
from .config import ConfigError, changed_settings, to_plain
from .data import ResumableSampler, make_loader
from .engine import Engine, StepOptions, plan_batches, step_options
from .hooks import CheckpointHook, EvalHook, MetricsWriter, TqdmHandler
from .optim import build_optimizer, make_schedule, peak_lr
from .precision import resolve_precision
from .progress import duration
from .task import Task, get_task

log = logging.getLogger("crossmae")


# ----------------------------------------------------------------------------- run folder
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
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
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


def setup_logging(out_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr (above the progress bar) and ``log.txt``; others warnings."""
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


def open_run_folder(cfg: DictConfig, out: Path | None, resume: str | None, *,
                    force: bool = False, resumable: bool = True) -> None:  # fmt: skip
    """A folder that does not already hold a run (a checkpoint, or an evaluation's
    results.json) unless resuming it (``--resume auto``, or a checkpoint inside it) or
    ``force``, locked, with the resolved ``config.yaml`` (a resumed run's is written once its
    checkpoint has accepted the settings), and logging into it (``out`` None: logging only).
    ``resumable``: the command takes ``--resume`` (said in the error)."""
    if out is not None:
        held = latest_checkpoint(out) or (out / "results.json" if (out / "results.json").is_file()
                                          else None)  # fmt: skip
        ways = ("continue it with --resume auto, " if resumable else "") + (
            "choose another output_dir, or add --force to replace it")  # fmt: skip
        if held and not force and resume is None:
            raise FileExistsError(f"{out} already holds a run ({Path(held).name}); {ways}")
        if held and not force and resume not in (None, "auto") and not _inside(resume, out):
            raise FileExistsError(
                f"{out} already holds a run ({Path(held).name}): resuming {resume} from another "
                f"folder would replace it; {ways}"
            )
        if du.rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            RunLock.take(out)
            if resume is None or (resume == "auto" and latest_checkpoint(out) is None):
                write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
        du.barrier()
    setup_logging(out, du.rank())


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def close_run(out: Path | None) -> None:
    """Wait for every process and release the folder."""
    du.barrier()
    if out is not None:
        RunLock.release(out)


# ----------------------------------------------------------------------------- the run
def resolve(task: Task, cfg: DictConfig, device: torch.device) -> DictConfig:
    """The config as the run uses it, what config.yaml and checkpoints hold: a copy with its
    open defaults decided (the run folder every process uses, ``train.precision=auto`` on this
    device, ``eval.precision=auto`` as the training's, the task's own: ``Task.resolve``). The
    task gets it as ``task.cfg``."""
    cfg = copy.deepcopy(cfg)
    task.cfg = cfg
    if "output_dir" in cfg:
        name = task.output_dir()
        cfg.output_dir = du.all_gather_objects(name)[0] if name is not None else None
    if "precision" in cfg.train:
        cfg.train.precision = resolve_precision(cfg.train.precision, device)
    if cfg.get("eval") is not None and cfg.eval.get("precision") == "auto":
        cfg.eval.precision = cfg.train.precision  # the evaluation's autocast: the training's
    task.resolve(cfg)
    return cfg


def run_task(task: Task | str, cfg: DictConfig, resume: str | None = None, *,
             force: bool = False) -> dict:  # fmt: skip
    """Run a task (an instance, or a registered name with ``cfg``) end to end (module docstring).

    Args:
        task: the task, or its registered name.
        cfg: its merged config (``task.schema``).
        resume: ``"auto"`` (the run folder's last checkpoint, or a fresh run), a checkpoint path,
            or None (a fresh run: a folder that holds a run is an error).
        force: a fresh run, or a checkpoint of another folder, may replace the results a run
            folder already holds.

    Returns:
        The results (what results.json holds): output folder, step, whether a signal stopped the
        run, the last evaluation's metrics, the task's summary.
    """
    if isinstance(task, str):
        task = get_task(task)(cfg)
    if resume == "auto" and OmegaConf.select(cfg, "output_dir") is None:
        raise ConfigError("--resume auto needs output_dir=... (the run folder to continue)")
    # settings and data: checked before anything is written
    task.device = device = du.init_from_env(cfg.train.device)
    cfg = resolve(task, cfg, device)
    if "optim" not in cfg:  # nothing to optimise: one run of the evaluation
        return _evaluate_only(task, cfg, force=force or resume == "auto")
    tc = cfg.train
    fitted = None
    if tc.get("gpu_memory") is not None:  # the largest micro-batch that fits, before any write
        from .memory import fit_to_gpu_memory

        budget, fitted = fit_to_gpu_memory(type(task), cfg, du.world_size(), device)
    micro, accum = plan_batches(tc.batch_size, du.world_size(), tc.micro_batch)
    options = step_options(task, cfg, accum)
    options.check(device, du.world_size())
    task.open_data()
    out = Path(cfg.output_dir)
    open_run_folder(cfg, out, resume, force=force)
    if fitted:
        log.info("train.gpu_memory=%s (%.3g GiB): %s", tc.gpu_memory, budget, fitted)

    # model, then each process's own streams (drop path, augmentations)
    torch.manual_seed(tc.seed)
    task.model = model = task.build_model(device)
    seed_all(tc.seed + du.rank())

    # data, optimizer, schedule
    dataset = task.train_set()
    sampler = ResumableSampler(len(dataset), per_rank_step=micro * accum, seed=tc.seed,
                               num_replicas=du.world_size(), rank=du.rank())  # fmt: skip
    workers = OmegaConf.select(cfg, "data.num_workers", default=0)  # none: the main process
    loader = make_loader(dataset, sampler, micro, workers, device.type == "cuda",
                         task.collate_fn())  # fmt: skip
    spe = sampler.steps_per_epoch
    total = tc.steps if tc.steps is not None else tc.epochs * spe
    lr = peak_lr(cfg.optim, tc.batch_size, task.lr_factor())
    schedule = make_schedule(cfg.optim, lr, total, spe)
    if schedule.warmup_steps >= total:
        log.warning("the warmup (%d steps) is as long as the whole run (%d steps): the lr never "
                    "reaches its peak %.3g; shorten optim.warmup_steps / warmup_epochs",
                    schedule.warmup_steps, total, lr)  # fmt: skip
    optimizer = build_optimizer(task.param_groups(model), lr, cfg.optim, device)

    # engine and hooks
    training = _training(task, cfg, out, model, optimizer, loader, schedule, total, options)
    engine = training.engine
    _resume(engine, task, cfg, out, resume)
    log.info("%s: %.2fM parameters (%.2fM trained) | %d process(es) x micro-batch %d x %d "
             "accumulation = batch %d | %d steps/epoch, %d steps, stop at step %d | lr %.3g "
             "(%s, warmup %d steps), precision %s, device %s", task.name,
             sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
             du.world_size(), micro, accum, tc.batch_size, spe, total, engine.steps, lr,
             schedule.name, schedule.warmup_steps, tc.precision, device)  # fmt: skip
    if device.type == "cpu":
        log.info("CPU threads: %d per process (OMP_NUM_THREADS=%s), OpenMP waits %s "
                 "(OMP_WAIT_POLICY), %d data worker(s); %d cores", torch.get_num_threads(),
                 os.environ.get("OMP_NUM_THREADS", "unset"),
                 os.environ.get("OMP_WAIT_POLICY", "unset").lower(), workers,
                 os.cpu_count() or 0)  # fmt: skip
    return _train(task, out, training)


@dataclass
class _Training:
    """The engine and the hooks the runner itself calls at the end."""

    engine: Engine
    writer: MetricsWriter
    evaluator: EvalHook
    saver: CheckpointHook


def _training(task: Task, cfg: DictConfig, out: Path, model, optimizer, loader, schedule,
              total: int, options: StepOptions) -> _Training:  # fmt: skip
    """The engine and its hooks: metrics, the task's own, evaluation, checkpoints."""
    lc = cfg.log

    def fields() -> dict:
        return {"format": task.format, "version": __version__, "task": task.name,
                "config": to_plain(cfg), **task.checkpoint_fields()}  # fmt: skip

    saver = CheckpointHook(out, fields, every_steps=lc.ckpt_every_steps,
                           every_epochs=lc.ckpt_every_epochs, exports=task.exports,
                           keep_every_epochs=lc.keep_every_epochs)  # fmt: skip
    evaluator = EvalHook(task.evaluation(), saver=saver, out=out,
                         stop_on_error=cfg.train.stop_on_eval_error)  # fmt: skip
    writer = MetricsWriter(out, images_per_step=cfg.train.batch_size, every_steps=lc.every_steps,
                           tensorboard=lc.tensorboard, progress=lc.progress,
                           extra=task.record_fields)  # fmt: skip
    steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    engine = Engine(model, optimizer, loader, schedule, task, steps=steps, device=task.device,
                    options=options, hooks=[writer, *task.hooks(), evaluator, saver])  # fmt: skip
    return _Training(engine, writer, evaluator, saver)


def _resume(engine: Engine, task: Task, cfg: DictConfig, out: Path, resume: str | None) -> None:
    """Continue from ``resume`` (``"auto"``: the folder's last checkpoint, if any): a checkpoint
    of the task's format, trained with the same settings unless ``train.resume_with_changes``."""
    path = latest_checkpoint(out) if resume == "auto" else resume
    if not path:
        if resume == "auto":
            log.info("no checkpoint in %s: starting a fresh run", out)
        return
    ck = load_checkpoint(path, expect=task.format)
    changes = []
    if ck.get("config") is not None:  # with what an older version left open decided the same way
        saved = OmegaConf.create(ck["config"])
        task.resolve(saved)
        changes = changed_settings(to_plain(saved), cfg)
    if changes and not cfg.train.resume_with_changes:
        raise ConfigError(f"{path} was trained with other settings ({'; '.join(changes)}): resume "
                          "with its settings, or add train.resume_with_changes=true to change "
                          "them")  # fmt: skip
    if du.rank() == 0:
        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
    engine.load_state_dict(ck, what=str(path), seed=cfg.train.seed)
    task.restore(ck)
    log.info("resumed from %s at step %d (epoch %d)", path, engine.step,
             engine.step // engine.steps_per_epoch)  # fmt: skip


def _train(task: Task, out: Path, training: _Training) -> dict:
    """Train, then the final checkpoint, evaluation and checkpoint; results.json."""
    engine, saver, evaluator = training.engine, training.saver, training.evaluator
    diverged = False

    def finish(interrupted: bool) -> bool:
        nonlocal diverged
        diverged = not interrupted and not finite_state(engine)
        if not interrupted and not diverged:  # saved before a final evaluation can fail
            saver.save_if_stale(engine)
            evaluator.evaluate_if_stale(engine)  # which writes the checkpoint again
        return interrupted or diverged

    start, t0 = engine.step, time.perf_counter()
    try:
        interrupted = engine.run(finish)
    except FloatingPointError as e:  # the loss stayed non-finite
        raise FloatingPointError(f"{e} ({last_checkpoint_of(out)})") from None
    result = {"output_dir": str(out), "step": engine.step,
              "epoch": engine.step / engine.steps_per_epoch, "interrupted": interrupted,
              "diverged": diverged, "metrics": evaluator.metrics,
              "final_loss": training.writer.last_record.get("loss", float("nan"))}  # fmt: skip
    if evaluator.spec is not None and evaluator.spec.best is not None:
        result["best"] = evaluator.best
    result.update(task.result_fields(result))
    if du.rank() == 0:
        if not (interrupted or diverged):
            task.after_run(result)
        write_text_atomic(out / "results.json", strict_json(result, indent=1) + "\n")
        state = "stopped" if interrupted else "diverged" if diverged else "done"
        took, steps = time.perf_counter() - t0, engine.step - start
        log.info("%s: %s", state, _summary_line(result, steps, took, training.writer))
    close_run(out)
    engine.stop.pass_on()
    if diverged:
        raise FloatingPointError(
            f"the run diverged: the loss of its last step ({engine.step}) was non-finite, or its "
            f"weights are; nothing was saved after it ({last_checkpoint_of(out)}). Lower the "
            "learning rate or set optim.clip_grad, then run again or --resume auto"
        )
    return result


def finite_state(engine: Engine) -> bool:
    """Whether the last step was taken (its loss finite) and every weight is finite."""
    return engine.taken and engine.weights_finite()


def last_checkpoint_of(out: Path) -> str:
    last = latest_checkpoint(out)
    return f"last checkpoint: {last}" if last else "no checkpoint was written yet"


def _evaluate_only(task: Task, cfg: DictConfig, force: bool) -> dict:
    """A task that trains nothing: its folder (if any), the model, one run of its evaluation,
    results.json."""
    task.open_data()
    out = task.output_dir()
    out = Path(du.all_gather_objects(str(out))[0]) if out is not None else None
    open_run_folder(cfg, out, resume=None, force=force, resumable=False)
    torch.manual_seed(cfg.train.seed)
    task.model = task.build_model(task.device)
    spec = task.evaluation()
    if spec is None:
        raise ConfigError(f"{task.name} trains nothing (no optim section) and has no evaluation")
    metrics = spec.run(0)
    result = {"output_dir": str(out) if out else None, "interrupted": False, "metrics": metrics,
              **task.result_fields({"metrics": metrics})}  # fmt: skip
    if du.rank() == 0 and out is not None:
        write_text_atomic(out / "results.json", strict_json(result, indent=1) + "\n")
    log.info("%s: %s", task.name, spec.line(metrics))
    if spec.tables is not None and (tables := spec.tables(metrics)):
        log.info("%s", tables)
    close_run(out)
    return result


def _summary_line(result: dict, steps: int, seconds: float, writer: MetricsWriter) -> str:
    """The end of a run in one line: step, this run's time and overall speed (evaluations and
    checkpoints included, as detectron2's "total training time"), final loss, results."""
    rate = steps * writer.images_per_step / max(seconds, 1e-9)
    speed = (f", {duration(seconds)} for {steps} steps: {seconds / steps:.3g} s/step, "
             f"{rate:.3g} img/s overall") if steps else ""  # fmt: skip
    results = Path(result["output_dir"]) / "results.json"
    return (f"step {result['step']} (epoch {result['epoch']:.3g}){speed}; final loss "
            f"{result['final_loss']:.4g}; {results}")  # fmt: skip
