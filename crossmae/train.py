"""Pretraining of CrossMAE and MAE: ``pretrain(cfg)`` sets up the model, data and schedule and
runs them on the training engine (``crossmae.engine``), read top to bottom.

Single process, torchrun (DDP; NCCL on GPU, gloo on CPU) and the submitit launcher all end here.
A run folder holds ``config.yaml``, ``log.txt``, ``metrics.jsonl``, TensorBoard events,
``checkpoint-last.pt`` (full state, exact resume), ``encoder.pt`` (encoder-only export),
``loss.png`` and ``recon/epoch-*.png``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
from omegaconf import DictConfig
from torch import nn

from . import __version__
from . import distributed as du
from .checkpoint import PRETRAIN_FORMAT, save_atomic, seed_all, write_text_atomic
from .config import ConfigError, ModelConfig, to_plain
from .data import (
    BuiltinPhotos,
    EvalTransform,
    ImageFiles,
    PretrainSamples,
    PretrainTransform,
    ResumableSampler,
    collate,
    make_loader,
)
from .data.gpu import JpegSamples, collate_raw, decode_batch
from .engine import Engine, Hooks, check_precision, open_run, plan_batches
from .knn import extract_features, knn_classify, topk_accuracy
from .models import create_model
from .models.layers import sdpa_device_problem, set_attention_backend
from .models.pretrained import encoder_export
from .optim import lr_at, param_groups, pretrain_lr
from .reconstruction import reconstruct
from .visualize import save_loss_curve, save_reconstruction_grid

log = logging.getLogger("crossmae")


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
    if mcfg.pred_ratio is None and mcfg.name.startswith("crossmae"):
        kwargs["pred_ratio"] = mcfg.mask_ratio  # γ = p unless set
    try:
        return create_model(mcfg.name, **kwargs)
    except TypeError as e:  # an argument the model does not take (e.g. pred_ratio for MAE)
        raise ConfigError(f"model {mcfg.name!r}: {e}") from None


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


def check_train_settings(tc: DictConfig, device: torch.device) -> None:
    """Pretraining's own ``train.*`` settings, checked before anything is written."""
    if problem := sdpa_device_problem(tc.sdpa, device.type):
        raise ConfigError(f"train.sdpa={problem}")
    if tc.activation_memory_budget != 1.0 and not tc.compile:
        raise ConfigError("train.activation_memory_budget applies to the compiled step: "
                          "set train.compile=true")  # fmt: skip


def pretrain_losses(budget: float = 1.0) -> Callable[..., dict[str, torch.Tensor]]:
    """The engine's ``losses`` of pretraining: the model's named losses and their sum.
    ``budget``: the activation memory budget the compiled step is partitioned with (read when
    the step compiles)."""

    def losses(forward, imgs: torch.Tensor, ids_shuffle: torch.Tensor) -> dict[str, torch.Tensor]:
        with functorch_config.patch(activation_memory_budget=budget):
            out = forward(imgs, ids_shuffle=ids_shuffle, with_pred=False)
        parts = {n: v for n, v in out.items() if n.startswith("loss_")}
        return {**parts, "loss": sum(parts.values())}

    return losses


# ----------------------------------------------------------------------------- the run
def pretrain(cfg: DictConfig, *, resume: str | None = None) -> dict:
    """Pretrain the model of ``cfg`` (a ``config.PretrainConfig``) on the training engine.

    Args:
        cfg: the merged config.
        resume: ``"auto"`` (continue from the output folder's last checkpoint, or start fresh),
            a checkpoint path, or None (a fresh run; an output folder holding a run is an error).

    Returns:
        A summary: output folder, steps done, final loss, whether the run was interrupted,
        skipped files.
    """
    tc, oc, lc = cfg.train, cfg.optim, cfg.log
    check_precision(tc.precision)
    device = du.init_from_env(tc.device)
    rank, world = du.rank(), du.world_size()
    micro, accum = plan_batches(tc.batch_size, world, tc.micro_batch)
    if tc.cuda_graph:
        check_cuda_graph(tc, device, world, accum)
    check_train_settings(tc, device)

    # data source first: a wrong path or an empty folder fails before anything is written
    if cfg.data.path:
        source = ImageFiles(cfg.data.path)
    else:
        source = BuiltinPhotos(cfg.data.demo_samples_per_epoch)
    knn_splits = []
    if lc.knn_every_epochs:
        if not (cfg.data.knn_train and cfg.data.knn_val):
            raise ConfigError("log.knn_every_epochs needs data.knn_train and data.knn_val")
        knn_splits = [ImageFiles(cfg.data.knn_train), ImageFiles(cfg.data.knn_val)]
        if knn_splits[0].classes != knn_splits[1].classes or not knn_splits[0].classes:
            raise ConfigError("data.knn_train and data.knn_val need the same class folders")

    # output folder (rank 0 names it; everyone uses that name)
    if resume == "auto" and cfg.output_dir is None:
        raise ConfigError("--resume auto needs output_dir=... (the run folder to continue)")
    out_dir = Path(du.all_gather_objects(str(cfg.output_dir or default_output_dir(cfg.model)))[0])
    open_run(cfg, resume, out_dir)
    if rank == 0:
        (out_dir / "recon").mkdir(exist_ok=True)

    # model and data
    if isinstance(source, ImageFiles):
        log.info("data: %d images in %s (%s layout)", len(source), source.root, source.layout)
    else:
        log.info(
            "data: %d crops of %d scikit-image photos per epoch", len(source), len(source.photos)
        )
    torch.manual_seed(tc.seed)  # the same initial weights on every process
    model = set_attention_backend(build_model(cfg.model).to(device), tc.sdpa)
    seed_all(tc.seed + rank)  # then per-process randomness (drop path)
    mask_ratio = model.mask_ratio
    pred_ratio = getattr(model, "pred_ratio", mask_ratio)
    scale = tuple(cfg.data.crop_scale)
    skipped: list[str] = []
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

    def inputs(batch: dict) -> dict[str, torch.Tensor]:
        skipped.extend(batch["skipped"])  # each one logged by the worker that met it
        # on CUDA the prefetcher has copied them already (or the device decodes them)
        return {"imgs": to_images(batch),
                "ids_shuffle": batch["ids_shuffle"].to(device, non_blocking=True)}  # fmt: skip

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
    optimizer = torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=base_lr,
                                  betas=tuple(oc.betas), fused=device.type == "cuda")  # fmt: skip

    # fixed images for the reconstruction PNGs
    span = len(source.photos) if isinstance(source, BuiltinPhotos) else len(source)
    vis_idx = torch.linspace(0, span - 1, min(lc.vis_images, span)).long().tolist()
    vis_set = PretrainSamples(source, EvalTransform(cfg.model.img_size), model.mask_sampler)
    vis_batch = collate([vis_set[(i, tc.seed + i)] for i in vis_idx])

    def visualise(epoch: int, *, final: bool = False) -> None:
        """The reconstruction PNG every ``log.vis_every_epochs`` epochs (and at a mid-epoch end)."""
        if rank != 0 or not (final or (lc.vis_every_epochs and epoch % lc.vis_every_epochs == 0)):
            return
        imgs = vis_batch["images"].to(device)
        rec = reconstruct(model, imgs, vis_batch["ids_shuffle"].to(device), pred_ratio=mask_ratio)
        title = f"{cfg.model.name}  epoch {epoch}  step {engine.step}  (all masked patches decoded)"
        save_reconstruction_grid(rec, out_dir / "recon" / f"epoch-{epoch:04d}.png", title)
        save_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png")

    def knn_monitor(step: int) -> dict:
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
        epoch = step / steps_per_epoch
        log.info("epoch %g: kNN top-1 %.2f", epoch, acc["top1"])
        engine.record({"step": step, "epoch": epoch, **{f"knn_{k}": v for k, v in acc.items()}},
                      "knn")  # fmt: skip
        return acc

    def fields() -> dict:
        return {"format": PRETRAIN_FORMAT, "version": __version__, "model_name": cfg.model.name,
                "model_config": model.config, "mask_ratio": mask_ratio, "pred_ratio": pred_ratio,
                "norm_pix_loss": model.norm_pix_loss, "img_size": cfg.model.img_size,
                "patch_size": model.patch_size, "config": to_plain(cfg),
                "skipped": skipped}  # fmt: skip

    engine = Engine(
        model, optimizer, out=out_dir, device=device, sampler=sampler, loader=loader,
        steps=last_step, inputs=inputs, losses=pretrain_losses(tc.activation_memory_budget),
        lr_at=lambda s: lr_at(s, base_lr=base_lr, total_steps=total_steps,
                              warmup_steps=warmup_steps, min_lr=oc.min_lr),
        hooks=Hooks(evaluate=knn_monitor if knn_splits else None, after_epoch=visualise,
                    checkpoint_fields=fields,
                    record_fields=lambda: {"skipped_files": len(set(skipped))}),
        accum=accum, batch_size=tc.batch_size, precision=tc.precision, clip_grad=oc.clip_grad,
        max_nonfinite=tc.max_nonfinite_steps, log_every=lc.every_steps,
        ckpt_every=lc.ckpt_every_steps, ckpt_every_epochs=1, keep_every_epochs=lc.keep_every_epochs,
        eval_every_epochs=lc.knn_every_epochs, compile=tc.compile, cuda_graph=tc.cuda_graph,
        prefetch=not cfg.data.gpu_decode, tensorboard=lc.tensorboard, progress=lc.progress,
        seed=tc.seed,
    )  # fmt: skip
    ck = engine.resume(resume)
    if ck:
        skipped.extend(ck.get("skipped", []))

    log.info(
        "%s: %.2fM params, p=%.2f γ=%.2f | %d process(es) x micro-batch %d x %d accumulation = "
        "batch %d | %d steps/epoch, %d epochs, stop at step %d | lr %.3g (warmup %d steps), "
        "precision %s, compile %s, CUDA graph %s, attention %s, device %s",
        cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, mask_ratio, pred_ratio,
        world, micro, accum, tc.batch_size, steps_per_epoch, tc.epochs, last_step, base_lr,
        warmup_steps, tc.precision, tc.compile, tc.cuda_graph, tc.sdpa, device,
    )  # fmt: skip
    result = engine.train()

    # wrap up
    step, interrupted = result["step"], result["interrupted"]
    all_skipped = sorted({n for names in du.all_gather_objects(skipped) for n in names})
    summary = {
        "output_dir": str(out_dir),
        "step": step,
        "epoch": step / steps_per_epoch,
        "final_loss": engine.last_record.get("loss", float("nan")),
        "interrupted": interrupted,
        "skipped_files": len(all_skipped),
    }
    if rank == 0:
        if not interrupted:
            if step % steps_per_epoch:  # stopped mid-epoch by max_steps
                visualise(step // steps_per_epoch, final=True)
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
    engine.finish()
    return summary
