"""The pretraining loop for CrossMAE and MAE: one function, ``pretrain(cfg)``, read top to bottom.

Single process, torchrun (DDP; NCCL on GPU, gloo on CPU) and the submitit launcher all end here.
A run folder holds ``config.yaml``, ``log.txt``, ``metrics.jsonl``, TensorBoard events,
``checkpoint-last.pt`` (full state, exact resume), ``encoder.pt`` (encoder-only export),
``loss.png`` and ``recon/epoch-*.png``.
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
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config as functorch_config
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__
from . import distributed as du
from .checkpoint import (
    LAST,
    PRETRAIN_FORMAT,
    encoder_export,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_strict,
    random_states,
    restore_random_states,
    save_atomic,
    write_text_atomic,
)
from .config import ConfigError, ModelConfig, to_plain
from .cuda_graph import GraphedStep
from .data import (
    BuiltinPhotos,
    CudaPrefetcher,
    EvalTransform,
    ImageFiles,
    PretrainSamples,
    PretrainTransform,
    ResumableSampler,
    collate,
    make_loader,
)
from .data.gpu import JpegSamples, collate_raw, decode_batch
from .knn import extract_features, knn_classify, topk_accuracy
from .models import create_model
from .models.layers import SDPA_BACKENDS, sdpa_device_problem, set_attention_backend
from .optim import lr_at, param_groups, pretrain_lr
from .reconstruction import reconstruct
from .visualize import save_loss_curve, save_reconstruction_grid

log = logging.getLogger("crossmae")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


# ----------------------------------------------------------------------------- building blocks
def build_model(mcfg: ModelConfig) -> nn.Module:
    """The registered model named by the config, with the config's settings applied."""
    kwargs = dict(mcfg.kwargs)
    kwargs.update(
        img_size=mcfg.img_size,
        mask_ratio=mcfg.mask_ratio,
        norm_pix_loss=mcfg.norm_pix_loss,
        drop_path_rate=mcfg.drop_path_rate,
    )
    for key in ("patch_size", "decoder_depth", "pred_ratio"):
        if getattr(mcfg, key) is not None:
            kwargs[key] = getattr(mcfg, key)
    try:
        return create_model(mcfg.name, **kwargs)
    except TypeError as e:  # an argument the model does not take (e.g. pred_ratio for MAE)
        raise ConfigError(f"model {mcfg.name!r}: {e}") from None


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


def check_cuda_graph(tc: DictConfig, device: torch.device, world: int, accum: int) -> None:
    """``train.cuda_graph`` replays forward + backward of one micro-batch on one CUDA device."""
    problem = None
    if device.type != "cuda":
        problem = f"a CUDA device (this run is on {device.type})"
    elif world > 1:
        problem = f"a single process (this run has {world}; DDP's gradient hooks are not captured)"
    elif accum > 1:
        problem = f"one micro-batch per step (train.micro_batch gives {accum})"
    elif tc.precision == "fp16":
        problem = "train.precision=bf16 or fp32 (fp16's loss scaler checks on the host)"
    if problem:
        raise ConfigError(f"train.cuda_graph=true needs {problem}")


def default_output_dir(mcfg: ModelConfig) -> Path:
    return Path("runs") / f"{mcfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


class StopRequest:
    """Records SIGTERM / SIGUSR1 / SIGUSR2 so a training loop can checkpoint at the next step
    boundary (pretraining, finetuning and the linear probe all use it).
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
        prev = self._previous.get(self.signum)
        if self.signum is not None and callable(prev):
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


def start_task_run(cfg: DictConfig, resume: str | None) -> tuple[torch.device, Path]:
    """The opening of every transfer task's run (cls, det, seg): a known precision, this
    process's device (joining torchrun's group), an output folder that does not already hold a
    run unless resuming, the resolved ``config.yaml`` in it, and logging. Returns (device,
    output folder)."""
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {cfg.precision!r}")
    dev = du.init_from_env(cfg.device)
    out = Path(cfg.output_dir)
    if resume is None and latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds a run; continue it with --resume auto")
    if du.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
    du.barrier()
    setup_logging(out, du.rank())
    return dev, out


def resume_task_run(
    out: Path, resume: str | None, model: nn.Module, optimizer, scaler
) -> dict | None:
    """``--resume auto`` (the folder's last checkpoint) or a path: restore the model, optimizer,
    scaler and this process's random streams (``random_states``); returns the checkpoint (for
    its step and extras)."""
    path = latest_checkpoint(out) if resume == "auto" else resume
    if not path:
        return None
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    rngs = ck.get("rng") or []
    if len(rngs) == du.world_size():  # each process continues its own random streams
        state = rngs[du.rank()]
        restore_random_states(state if isinstance(state, dict) else {"torch": state})
    log.info("resumed from %s at step %d", path, ck["step"])
    return ck


TASK_MAX_NONFINITE = 5  # consecutive non-finite losses before a transfer task stops


def run_task_iterations(
    *,
    out: Path,
    iterations: int,
    step: int,
    sampler: ResumableSampler,
    loader,
    accum: int,
    model: nn.Module,
    ddp: nn.Module,
    optimizer,
    scaler,
    device: torch.device,
    lr_at: Callable[[int], float],
    losses_of: Callable[[Any], dict[str, torch.Tensor]],
    checkpoint_fields: dict,
    evaluate: Callable[[int], dict],
    metrics_file,
    log_every: int,
    eval_every: int,
    ckpt_every: int,
    finish: Callable[[dict], None] | None = None,
) -> dict:
    """The iteration loop of the detection and segmentation tasks.

    Per step: the lr of ``lr_at(step)`` (times each group's ``lr_scale``); ``accum`` micro-batches
    through ``losses_of(batch)`` (a dict with the total ``"loss"`` and any parts to log), with
    DDP's gradient sync on the last one only; the optimizer step, skipped on a non-finite loss
    (``TASK_MAX_NONFINITE`` in a row stop the run); every ``log_every`` steps a metrics record
    with the window's mean losses; evaluation every ``eval_every`` and a checkpoint every
    ``ckpt_every`` steps into ``out/checkpoint-last.pt`` (model, optimizer, scaler, step, every
    process's random state, the latest metrics and ``checkpoint_fields``: the task's format,
    config, ...). A stop request (SIGTERM / SIGUSR1 / SIGUSR2) ends the step, saves and
    returns ``interrupted``; a finished run evaluates, saves, writes ``results.json`` and calls
    ``finish(metrics)`` on rank 0. Resuming from ``step`` repeats the same batches (the
    sampler's order is a function of the epoch).
    """
    rank, world = du.rank(), du.world_size()

    def save(step: int, metrics: dict | None) -> None:
        rngs = du.all_gather_objects(random_states())  # every process's streams (drop path)
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "rng": rngs}  # fmt: skip
            save_atomic({**checkpoint_fields, **state, "metrics": metrics}, out / LAST)

    metrics, interrupted, nonfinite_run, window = None, False, 0, {}
    ddp.train()
    with StopRequest() as stop:
        while step < iterations and not interrupted:
            epoch, start = divmod(step, sampler.steps_per_epoch)
            sampler.set_epoch(epoch, start)
            batches = iter(loader)
            for _ in range(start, sampler.steps_per_epoch):
                lr = lr_at(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                loss_sum = torch.zeros((), device=device)
                for k in range(accum):
                    last = world == 1 or k == accum - 1
                    with contextlib.nullcontext() if last else ddp.no_sync():
                        parts = losses_of(next(batches))
                        scaler.scale(parts["loss"] / accum).backward()
                    loss_sum += parts["loss"].detach() / accum
                    for name, v in parts.items():  # summed over the log window
                        if name != "loss":
                            window[name] = window.get(name, 0.0) + v.detach() / accum
                # step (skipped on a non-finite loss; all processes agree)
                nonfinite, stopping = stop.agree(loss_sum)
                if nonfinite:
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_run += 1
                    log.warning("iteration %d: non-finite loss, step skipped", step)
                    if nonfinite_run >= TASK_MAX_NONFINITE:
                        raise FloatingPointError(
                            f"the loss was non-finite for {nonfinite_run} iterations in a row"
                        )
                else:
                    nonfinite_run = 0
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                window["loss"] = window.get("loss", 0.0) + loss_sum
                window["steps"] = window.get("steps", 0) + 1
                if step % log_every == 0 or step == iterations:  # means since the last record
                    n = window.pop("steps")
                    record = {"step": step, "lr": lr}
                    record.update({k: float(du.all_reduce_mean(v / n)) for k, v in window.items()})
                    window = {}
                    append_record(metrics_file, record)
                if stopping:
                    interrupted = True
                    save(step, metrics)
                    break
                if eval_every and step % eval_every == 0 and step < iterations:
                    metrics = evaluate(step)
                if step % ckpt_every == 0:
                    save(step, metrics)
                if step >= iterations:
                    break
    if not interrupted:
        metrics = evaluate(step)
        save(step, metrics)
        if rank == 0:
            result = {"step": step, "metrics": metrics}
            write_text_atomic(out / "results.json", json.dumps(result, indent=1))
            if finish is not None:
                finish(metrics)
    if metrics_file is not None:
        metrics_file.close()
    du.barrier()
    if interrupted:
        stop.forward()
    return {"output_dir": str(out), "step": step, "interrupted": interrupted, "metrics": metrics}


def append_record(metrics_file, record: dict) -> None:
    """One JSON line of ``metrics.jsonl``, flushed (rank 0 holds the file; elsewhere None)."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()


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


# ----------------------------------------------------------------------------- the loop
def pretrain(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Pretrain the model of ``cfg`` (a ``config.PretrainConfig``).

    Args:
        cfg: the merged config.
        resume: ``"auto"`` (continue from the output folder's last checkpoint, or start fresh),
            a checkpoint path, or None (a fresh run; an output folder holding a run is an error).

    Returns:
        A summary: output folder, steps done, final loss, whether the run was interrupted,
        skipped files.
    """
    tc, oc, lc = cfg.train, cfg.optim, cfg.log
    if tc.precision not in PRECISIONS:
        raise ConfigError(
            f"train.precision must be one of {sorted(PRECISIONS)}, got {tc.precision!r}"
        )
    device = du.init_from_env(tc.device)
    rank, world = du.rank(), du.world_size()
    micro, accum = plan_batches(tc.batch_size, world, tc.micro_batch)
    if tc.cuda_graph:
        check_cuda_graph(tc, device, world, accum)
    if tc.sdpa not in SDPA_BACKENDS:
        raise ConfigError(f"train.sdpa must be one of {sorted(SDPA_BACKENDS)}, got {tc.sdpa!r}")
    if problem := sdpa_device_problem(tc.sdpa, device.type):
        raise ConfigError(f"train.sdpa={problem}")
    if not 0.0 <= tc.activation_memory_budget <= 1.0:
        raise ConfigError(
            f"train.activation_memory_budget is in [0, 1], got {tc.activation_memory_budget}"
        )
    if tc.activation_memory_budget != 1.0 and not tc.compile:
        raise ConfigError("train.activation_memory_budget applies to the compiled step: "
                          "set train.compile=true")  # fmt: skip

    # data source first: a wrong path or an empty folder fails before anything is written
    if cfg.data.path:
        source = ImageFiles(cfg.data.path)
    else:
        source = BuiltinPhotos(cfg.data.demo_samples_per_epoch)
    knn_splits = []
    if cfg.log.knn_every_epochs:
        if not (cfg.data.knn_train and cfg.data.knn_val):
            raise ConfigError("log.knn_every_epochs needs data.knn_train and data.knn_val")
        knn_splits = [ImageFiles(cfg.data.knn_train), ImageFiles(cfg.data.knn_val)]
        if knn_splits[0].classes != knn_splits[1].classes or not knn_splits[0].classes:
            raise ConfigError("data.knn_train and data.knn_val need the same class folders")

    # output folder (rank 0 names it; everyone uses that name)
    if resume == "auto" and cfg.output_dir is None:
        raise ConfigError("--resume auto needs output_dir=... (the run folder to continue)")
    out_dir = Path(du.all_gather_objects(str(cfg.output_dir or default_output_dir(cfg.model)))[0])
    if resume is None and latest_checkpoint(out_dir) is not None:
        raise FileExistsError(
            f"{out_dir} already holds a run; continue it with --resume auto or choose "
            "another output_dir"
        )
    if rank == 0:
        (out_dir / "recon").mkdir(parents=True, exist_ok=True)
    du.barrier()
    setup_logging(out_dir, rank)

    # model and data
    if isinstance(source, ImageFiles):
        log.info("data: %d images in %s (%s layout)", len(source), source.root, source.layout)
    else:
        log.info(
            "data: %d crops of %d scikit-image photos per epoch", len(source), len(source.photos)
        )
    torch.manual_seed(tc.seed)  # the same initial weights on every process
    model = set_attention_backend(build_model(cfg.model).to(device), tc.sdpa)
    torch.manual_seed(tc.seed + rank)  # then per-process randomness (drop path)
    mask_ratio = model.mask_ratio
    pred_ratio = getattr(model, "pred_ratio", mask_ratio)
    scale = tuple(cfg.data.crop_scale)
    if cfg.data.gpu_decode:  # workers read bytes; the device decodes, crops and resizes
        dataset = JpegSamples(source, cfg.model.img_size, model.mask_sampler, scale)
        collate_fn = collate_raw

        def to_images(batch: dict) -> torch.Tensor:
            return decode_batch(batch, cfg.model.img_size, device)
    else:
        # uint8 crops: normalised by the model on the device (a quarter of the bytes to copy)
        dataset = PretrainSamples(
            source, PretrainTransform(cfg.model.img_size, scale, normalize=False),
            model.mask_sampler,
        )  # fmt: skip
        collate_fn = collate

        def to_images(batch: dict) -> torch.Tensor:
            return batch["images"].to(device, non_blocking=True)

    sampler = ResumableSampler(
        len(dataset), per_rank_step=micro * accum, num_replicas=world, rank=rank, seed=tc.seed
    )
    loader = make_loader(
        dataset, sampler, micro, cfg.data.num_workers, device.type == "cuda", collate_fn
    )
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = tc.epochs * steps_per_epoch
    last_step = min(total_steps, tc.max_steps) if tc.max_steps else total_steps

    # optimizer and schedule (derived values are logged, not written into the config)
    base_lr = (
        oc.lr if oc.lr is not None else pretrain_lr(oc.blr, tc.batch_size, mask_ratio, pred_ratio)
    )
    warmup_steps = round(oc.warmup_epochs * steps_per_epoch)
    groups = param_groups(model, oc.weight_decay)
    optimizer = torch.optim.AdamW(
        groups, lr=base_lr, betas=tuple(oc.betas), fused=device.type == "cuda"
    )
    amp_dtype = PRECISIONS[tc.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")

    # resume: model, optimizer, scaler, RNG, position
    step = 0
    skipped: list[str] = []
    ckpt_path = latest_checkpoint(out_dir) if resume == "auto" else resume
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        load_state_dict_strict(model, ckpt["model"], what=str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        if len(rngs) == world:  # each process continues its own random streams
            restore_random_states(rngs[rank])
        else:
            torch.manual_seed(tc.seed + rank + ckpt["step"])
            log.warning("%d processes now, %d at save: random streams reseeded", world, len(rngs))
        step, skipped = ckpt["step"], list(ckpt.get("skipped", []))
        if ckpt["steps_per_epoch"] != steps_per_epoch:
            raise ConfigError(
                f"{ckpt_path} was written with {ckpt['steps_per_epoch']} steps per epoch, this "
                f"run has {steps_per_epoch}: resume with the same data and batch size"
            )
        log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, step // steps_per_epoch)
    elif resume == "auto":
        log.info("no checkpoint in %s: starting a fresh run", out_dir)
    if rank == 0:
        OmegaConf.save(cfg, out_dir / "config.yaml")
        truncate_metrics(out_dir / "metrics.jsonl", step)

    # wrappers: DDP, then torch.compile
    ddp_model = (
        DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    )
    forward = torch.compile(ddp_model) if tc.compile else ddp_model
    graphed: GraphedStep | None = None  # train.cuda_graph: captured on the first batch

    def loss_of(imgs: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        """The summed named losses of one forward (autocast's weight cache is off under CUDA-graph
        capture)."""
        with (
            torch.autocast(
                device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                cache_enabled=not tc.cuda_graph,
            ),
            # read when the step compiles (first call, recompilations)
            functorch_config.patch(activation_memory_budget=tc.activation_memory_budget),
        ):  # fmt: skip
            out = forward(imgs, ids_shuffle=ids_shuffle, with_pred=False)
        return sum(v for n, v in out.items() if n.startswith("loss_"))

    # fixed images for the reconstruction PNGs
    span = len(source.photos) if isinstance(source, BuiltinPhotos) else len(source)
    vis_idx = torch.linspace(0, span - 1, min(lc.vis_images, span)).long().tolist()
    vis_set = PretrainSamples(source, EvalTransform(cfg.model.img_size), model.mask_sampler)
    vis_batch = collate([vis_set[(i, tc.seed + i)] for i in vis_idx])

    writer = None
    if rank == 0 and lc.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out_dir / "tb", purge_step=step)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    progress = None
    if rank == 0 and lc.progress:
        from tqdm import tqdm

        progress = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True)

    log.info(
        "%s: %.2fM params, p=%.2f γ=%.2f | %d process(es) x micro-batch %d x %d accumulation = "
        "batch %d | %d steps/epoch, %d epochs, stop at step %d | lr %.3g (warmup %d steps), "
        "precision %s, compile %s, CUDA graph %s, attention %s, device %s",
        cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, mask_ratio, pred_ratio,
        world, micro, accum, tc.batch_size, steps_per_epoch, tc.epochs, last_step, base_lr,
        warmup_steps, tc.precision, tc.compile, tc.cuda_graph, tc.sdpa, device,
    )  # fmt: skip

    def save(tag: str = LAST) -> None:
        rngs = du.all_gather_objects(random_states())  # every process's streams, exact resume
        if rank != 0:
            return
        state = {
            "format": PRETRAIN_FORMAT,
            "version": __version__,
            "model_name": cfg.model.name,
            "model_config": model.config,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": step // steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "rng": rngs,
            "mask_ratio": mask_ratio,
            "pred_ratio": pred_ratio,
            "norm_pix_loss": model.norm_pix_loss,
            "img_size": cfg.model.img_size,
            "patch_size": model.patch_size,
            "config": to_plain(cfg),
            "skipped": skipped,
        }
        save_atomic(state, out_dir / tag)

    def knn_monitor(epoch: int) -> None:
        """kNN top-1 / top-5 of the encoder's average-pooled features (every process joins)."""
        feats = [
            extract_features(model.encoder, split, img_size=cfg.model.img_size, pool="avg",
                             num_workers=cfg.data.num_workers, device=device)
            for split in knn_splits
        ]  # fmt: skip
        model.train()
        (ftr, ytr), (fva, yva) = feats
        scores = knn_classify(ftr, ytr, fva, num_classes=len(knn_splits[0].classes))
        acc = topk_accuracy(scores, yva)
        log.info("epoch %d: kNN top-1 %.2f", epoch, acc["top1"])
        append_record(
            metrics_file,
            {"step": step, "epoch": epoch, **{f"knn_{k}": v for k, v in acc.items()}},
        )
        if writer is not None:
            for k, v in acc.items():
                writer.add_scalar(f"knn/{k}", v, step)

    def visualise(epoch: int) -> None:
        if rank != 0:
            return
        imgs = vis_batch["images"].to(device)
        rec = reconstruct(model, imgs, vis_batch["ids_shuffle"].to(device), pred_ratio=mask_ratio)
        title = f"{cfg.model.name}  epoch {epoch}  step {step}  (all masked patches decoded)"
        save_reconstruction_grid(rec, out_dir / "recon" / f"epoch-{epoch:04d}.png", title)
        save_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png")

    interrupted = False
    nonfinite_run = 0

    def new_window() -> dict:
        return {"loss": torch.zeros((), device=device), "good": 0, "steps": 0, "images": 0,
                "data": 0.0, "t0": time.perf_counter()}  # fmt: skip

    window = new_window()
    loss_value = float("nan")
    grad_norm = None
    model.train()
    with StopRequest() as stop:
        while step < last_step and not interrupted:
            epoch, start = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start)
            batches = iter(loader)
            if device.type == "cuda" and not cfg.data.gpu_decode:
                batches = CudaPrefetcher(batches, device)  # copies overlap the previous step
            for _ in range(start, steps_per_epoch):
                # schedule
                lr = lr_at(
                    step, base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                    min_lr=oc.min_lr,
                )  # fmt: skip
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]

                # forward + backward, accumulated over micro-batches
                step_loss = torch.zeros((), device=device)
                for k in range(accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    imgs = to_images(batch)  # on CUDA already there (CudaPrefetcher) or decoded
                    ids = batch["ids_shuffle"].to(device, non_blocking=True)
                    window["data"] += time.perf_counter() - t0
                    skipped += batch["skipped"]
                    for name in batch["skipped"]:
                        log.warning("skipped unreadable file %s", name)
                    if tc.cuda_graph:  # one process, one micro-batch (check_cuda_graph)
                        if graphed is None:
                            graphed = GraphedStep(loss_of, model.parameters(), imgs=imgs,
                                                  ids_shuffle=ids)  # fmt: skip
                        step_loss += graphed(imgs=imgs, ids_shuffle=ids)
                    else:
                        no_sync = world > 1 and k < accum - 1
                        with ddp_model.no_sync() if no_sync else contextlib.nullcontext():
                            loss = loss_of(imgs, ids)
                            scaler.scale(loss / accum).backward()
                        step_loss += loss.detach() / accum
                    window["images"] += len(imgs) * world

                # backward + step; all processes agree on skipping a non-finite step and on stopping
                nonfinite, stopping = stop.agree(step_loss)
                if nonfinite:
                    if graphed is None:  # a replay overwrites the graph's gradients
                        optimizer.zero_grad(set_to_none=True)
                    nonfinite_run += 1
                    log.warning(
                        "step %d: non-finite loss, step skipped (%d in a row)", step, nonfinite_run
                    )
                    if nonfinite_run >= tc.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"the loss was non-finite for {nonfinite_run} steps in a row (last at "
                            f"step {step}); lower the learning rate, set optim.clip_grad, or use "
                            f"train.precision=bf16/fp32. Last good state: {out_dir / LAST}"
                        )
                else:
                    nonfinite_run = 0
                    logging_now = (step + 1) % lc.every_steps == 0 or step + 1 == last_step
                    if oc.clip_grad is not None or logging_now:
                        scaler.unscale_(optimizer)
                        grad_norm = nn.utils.clip_grad_norm_(
                            model.parameters(), oc.clip_grad or math.inf
                        )
                    scaler.step(optimizer)
                    scaler.update()
                    if graphed is None:
                        optimizer.zero_grad(set_to_none=True)
                    window["loss"] += step_loss
                    window["good"] += 1
                step += 1
                window["steps"] += 1

                # log
                if step % lc.every_steps == 0 or step == last_step or stopping:
                    loss_value = du.all_reduce_mean(window["loss"] / max(window["good"], 1)).item()
                    dt = time.perf_counter() - window["t0"]
                    record = {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "loss": loss_value,
                        "lr": lr,
                        "img_per_s": window["images"] / dt,
                        "step_time_s": dt / window["steps"],
                        "data_time_s": window["data"] / window["steps"],
                        "skipped_files": len(skipped),
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                        grad_norm = None
                    if device.type == "cuda":
                        record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    append_record(metrics_file, record)
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step":
                                writer.add_scalar(f"train/{key}", value, step)
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{loss_value:.4f}",
                            lr=f"{lr:.2e}",
                            img_s=f"{record['img_per_s']:.0f}",
                        )
                    window = new_window()
                if progress is not None:
                    progress.update(1)

                # checkpoint
                if stopping:
                    save()
                    log.warning(
                        "signal %s: checkpoint written at step %d; continue with --resume auto",
                        signal.Signals(stop.signum).name if stop.signum else "from another rank",
                        step,
                    )
                    interrupted = True
                    break
                if lc.ckpt_every_steps and step % lc.ckpt_every_steps == 0:
                    save()
                if step >= last_step:
                    break

            # end of epoch
            if interrupted:
                break
            epoch_done = step % steps_per_epoch == 0
            done_epoch = step // steps_per_epoch
            save()
            if epoch_done and lc.keep_every_epochs and done_epoch % lc.keep_every_epochs == 0:
                save(f"checkpoint-epoch{done_epoch}.pt")
            if epoch_done and lc.vis_every_epochs and done_epoch % lc.vis_every_epochs == 0:
                visualise(done_epoch)
            if epoch_done and knn_splits and done_epoch % lc.knn_every_epochs == 0:
                knn_monitor(done_epoch)

    # wrap up
    if progress is not None:
        progress.close()
    if metrics_file is not None:
        metrics_file.close()
    if writer is not None:
        writer.close()
    all_skipped = sorted({n for names in du.all_gather_objects(skipped) for n in names})
    summary = {
        "output_dir": str(out_dir),
        "step": step,
        "epoch": step / steps_per_epoch,
        "final_loss": loss_value,
        "interrupted": interrupted,
        "skipped_files": len(all_skipped),
    }
    if rank == 0:
        if not interrupted:
            if step % steps_per_epoch:  # stopped mid-epoch by max_steps
                visualise(step // steps_per_epoch)
            export = encoder_export(
                model,
                model_name=cfg.model.name,
                extra={"step": step, "pretrain_config": to_plain(cfg)},
            )
            save_atomic(export, out_dir / "encoder.pt")
        write_text_atomic(
            out_dir / "summary.json", json.dumps({**summary, "skipped": all_skipped}, indent=1)
        )
        if all_skipped:
            log.warning(
                "skipped %d unreadable files: %s", len(all_skipped), ", ".join(all_skipped[:10])
            )
        log.info("done: %s", json.dumps(summary))
        if not interrupted:
            log.info(
                "look at %s: loss.png, recon/epoch-*.png (reconstructions), metrics.jsonl, tb/; "
                "checkpoint-last.pt and encoder.pt for the transfer tasks",
                out_dir,
            )
    du.barrier()
    if interrupted:
        stop.forward()
    return summary
