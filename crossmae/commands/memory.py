"""``crossmae benchmark memory``: the GPU memory of a config's training, planned on fake tensors
(``crossmae.memory``) in seconds on any machine, before a GPU is rented.

    crossmae benchmark memory --config configs/pretrain/crossmae_vit_base_800ep_pred0.25.yaml
    crossmae benchmark memory --all --gpu-memory 40

For every config: the per-GPU peak split into parameters, gradients, optimizer state and
activations, then one JSON line (``config``, ``gpus``, ``batch_per_gpu``, ``peak_gib``, ``fits``
against ``--gpu-memory``, ...). The GPU count is ``--gpus``, else the one the config's
``# Hardware:`` line names, else 1. A transfer config's encoder, untrained, is ``--arch``, else
its ``encoder.arch``, else its ``# Encoder:`` line, else the registered model of the size its
file name says (``vit_base`` -> crossmae_vit_base_patch16); values a config leaves required
(data paths) are not read.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from crossmae.checks import int_at_least
from crossmae.config import ConfigError
from crossmae.task import register_command

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER = "not-read-by-the-memory-planner"


def task_of_config(path: Path) -> str | None:
    """The registered task a shipped config belongs to, from its folder and name (None: one
    that does not train, such as ``cls/frozen_*``)."""
    kind, stem = path.parent.name, path.stem
    if kind in ("pretrain", "ablate"):
        return "pretrain"
    if kind == "cls":
        first = stem.split("_")[0]
        return {"finetune": "finetune", "overfit": "finetune", "linprobe": "linprobe"}.get(first)
    if kind in ("det", "seg"):
        return kind
    raise ConfigError(f"{path}: cannot tell its task from its folder ({kind}/); name it with "
                      "--task")  # fmt: skip


def gpus_of_config(path: Path) -> int:
    """The GPU count a config's ``# Hardware:`` line names (1 if none)."""
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "eight": 8}
    for line in path.read_text().splitlines():
        if not line.startswith("# Hardware:"):
            continue
        if m := re.search(r"\b(\w+) (\d+)-GPU nodes?\b", line):  # "two 8-GPU nodes"
            nodes = words.get(m.group(1)) or (int(m.group(1)) if m.group(1).isdigit() else 1)
            return nodes * int(m.group(2))
        if m := re.search(r"\b(\d+) GPUs\b", line):
            return int(m.group(1))
    return 1


def encoder_of_config(path: Path) -> tuple[str, dict] | None:
    """The encoder a transfer config's ``# Encoder:`` line names, with its settings
    (``# Encoder: crossmae_vit_tiny_patch8 img_size=32 patch_size=4``)."""
    for line in path.read_text().splitlines():
        if line.startswith("# Encoder:"):
            name, *settings = line.removeprefix("# Encoder:").split()
            return name, {k: int(v) for k, v in (item.split("=", 1) for item in settings)}
    return None


def arch_of_config(path: Path) -> str | None:
    """The registered model whose encoder a transfer config of this file name is sized for."""
    from crossmae.models.registry import list_models

    m = re.search(r"vit_(tiny|small|base|large|huge)", path.stem)
    if m is None:
        return None
    return next(iter(list_models(f"crossmae_vit_{m.group(1)}_*")), None)


def planned_config(task, path: Path | None, overrides: list[str], arch: str | None):
    """The config as planned: the file and overrides, an untrained encoder of ``arch``, every
    required value not given filled with a placeholder (nothing is read)."""
    from omegaconf import OmegaConf

    from crossmae.config import _file_chain, load_config

    files = [path] if path is not None else []
    required = {
        k for f in files for part in _file_chain(Path(f)) for k in OmegaConf.missing_keys(part)
    }
    given = {o.split("=", 1)[0] for o in overrides}
    fill = [f"{k}={PLACEHOLDER}" for k in sorted(required - given - {"encoder.checkpoint"})]
    cfg = load_config(task.schema, files, [*fill, *overrides])
    if "encoder" in cfg:
        named = encoder_of_config(path) if path is not None else None
        if arch is None and cfg.encoder.arch is None and named is not None:
            arch, settings = named
            cfg.encoder.arch_settings = {**cfg.encoder.arch_settings, **settings}
        arch = arch or cfg.encoder.arch or (arch_of_config(path) if path is not None else None)
        if arch is None:
            raise ConfigError(f"{path}: no encoder named (encoder.arch, a '# Encoder:' line or "
                              "vit_<size> in its name); name one with --arch")  # fmt: skip
        cfg.encoder.checkpoint, cfg.encoder.arch = None, arch
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, PLACEHOLDER)
    return cfg


def plan_one(args, path: Path | None, task_name: str):
    from crossmae.memory import plan_memory
    from crossmae.task import get_task

    task = get_task(task_name)
    cfg = planned_config(task, path, args.overrides, args.arch)
    gpus = args.gpus or (gpus_of_config(path) if path is not None else 1)
    name = str(path.relative_to(REPO)) if path and path.is_relative_to(REPO) else str(path)
    if cfg.train.get("gpu_memory") is not None:  # what a run with this setting would choose
        import torch

        from crossmae.memory import fit_to_gpu_memory

        asked = cfg.train.gpu_memory == "auto" and torch.cuda.is_available()  # this machine's GPU
        budget, why = fit_to_gpu_memory(task, cfg, gpus, torch.device("cuda" if asked else "cpu"))
        print(f"{name}: train.gpu_memory={cfg.train.gpu_memory}: {why}")
        args.gpu_memory = budget  # the card the verdict is about
    return plan_memory(task, cfg, gpus, name=name)


def describe(plan, gpu_memory: float) -> str:
    gib = {k: v / 2**30 for k, v in plan.parts.items()}
    verdict = "fits" if plan.peak_gib <= gpu_memory else "does NOT fit"
    return (f"{plan.config}: {plan.gpus} GPU(s) x batch {plan.batch_per_gpu} (micro-batch "
            f"{plan.micro_batch} x {plan.accumulation}"
            f"{', activation checkpointing' if plan.activation_checkpointing else ''}), "
            f"{plan.precision}: peak "
            f"{plan.peak_gib:.2f} GiB per GPU ({verdict} in {gpu_memory:g}); at the training "
            f"peak: parameters {gib.get('parameters', 0):.2f}, gradients "
            f"{gib.get('gradients', 0):.2f}, optimizer {gib.get('optimizer', 0):.2f}, "
            f"activations {gib.get('activations', 0):.2f}"
            + (f", DDP buckets {gib['ddp_buckets']:.2f}" if "ddp_buckets" in gib else "")
            + f"; evaluation "
            f"{plan.eval_peak / 2**30:.2f}")  # fmt: skip


def shipped_configs() -> list[Path]:
    """Every shipped config that trains."""
    return [p for p in sorted((REPO / "configs").rglob("*.yaml")) if task_of_config(p)]


def zoo_table(plans: list, gpu_memory: float) -> str:
    """The plans as a model-zoo table (markdown)."""
    lines = ["| config | GPUs | batch per GPU | micro-batch x accumulation | precision | "
             "estimated peak per GPU | training GFLOPs per image | fits in |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in plans:
        fits = f"{gpu_memory:g} GiB" if p.peak_gib <= gpu_memory else f"NOT {gpu_memory:g} GiB"
        ckpt = ", checkpointing" if p.activation_checkpointing else ""
        lines.append(f"| {p.config} | {p.gpus} | {p.batch_per_gpu} | {p.micro_batch} x "
                     f"{p.accumulation}{ckpt} | {p.precision} | {p.peak_gib:.2f} GiB | "
                     f"{p.train_flops_per_image / 1e9:.1f} | {fits} |")  # fmt: skip
    return "\n".join(lines)


def cmd_memory(args) -> int:
    from crossmae.memory import PlanError

    if not args.config and not args.all:
        raise ConfigError("name a config (--config FILE) or --all")
    paths = shipped_configs() if args.all else [Path(args.config).resolve()]
    status, plans = 0, []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        task_name = args.task or task_of_config(path)
        if task_name is None:
            print(f"{path.name}: does not train; skipped")
            continue
        try:
            plan = plan_one(args, path, task_name)
        except (PlanError, ConfigError) as e:
            print(f"{path}: cannot plan: {e}")
            status = 1
            continue
        print(describe(plan, args.gpu_memory) + "".join(f"; {n}" for n in plan.notes))
        print(json.dumps(plan.row(args.gpu_memory)), flush=True)
        plans.append(plan)
    if args.table:
        print(zoo_table(plans, args.gpu_memory))
    return status


@register_command(("benchmark", "memory"),
                  help="GPU memory of a config's training, planned on fake tensors",
                  description=__doc__)  # fmt: skip
def _memory_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE", help="a config file")
    p.add_argument("--all", action="store_true", help="every shipped config that trains")
    p.add_argument("--task", default=None, help="the task (default: from the config's folder)")
    p.add_argument("--gpus", type=int_at_least(1), default=None,
                   help="processes (default: the config's # Hardware: line, else 1)")  # fmt: skip
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="the card's memory the plan is checked against (default 80)")  # fmt: skip
    p.add_argument(
        "--arch",
        default=None,
        help="the encoder of a transfer config (default: its encoder.arch, its '# Encoder:' "
        "line, or the size its file name says)",
    )
    p.add_argument("--table", action="store_true",
                   help="end with the plans as a markdown table (a model zoo)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config settings")
    p.set_defaults(func=cmd_memory)
