"""Transfer evaluation of one pretraining checkpoint: every registered transfer stage (ImageNet
linear probe and finetuning, COCO ViTDet Mask R-CNN, ADE20K UperNet, and any task a package
registers with a ``TransferStage``), then one results table (OUT/results.md and results.json:
each stage's headline numbers, config and status).

    IMAGENET=/data/imagenet COCO=/data/coco ADE20K=/data/ADEChallengeData2016 \\
        crossmae transfer runs/crossmae_b/checkpoint-last.pt [OUT]      # = tools/transfer.sh
    crossmae transfer --smoke runs/demo/checkpoint-last.pt /tmp/smoke   # CPU, shared data
    crossmae transfer --list                                            # the stages
    crossmae transfer --curve runs/crossmae_b [OUT] [--watch]   # every kept checkpoint of a run

Options:   --smoke           every stage for a few steps on tiny splits of ../shared/data (or
                             $CROSSMAE_SHARED) on the CPU: a check of the wiring, not of accuracy
           --stages "a b"    a subset of the stages (default: the stages --list marks "default",
                             in their order; with --curve those it marks "curve")
           --config STAGE=FILE  a stage's config file instead of its per-size one (the file
                             names its data: the stage's dataset variable is then optional)
           --curve RUN       every checkpoint the run folder kept (pretraining with
                             log.keep_every_epochs=N: encoder-epochN.pt), each in OUT/epochN/,
                             then OUT/curve.md, curve.json, curve.png (each metric against the
                             epoch); a checkpoint evaluated already is skipped
           --watch, --poll S  with --curve: look again every S seconds (60) until the run has
                             finished and its last kept checkpoint is evaluated
Variables: each stage's dataset root (--list names them: IMAGENET with train/ and val/, COCO with
           annotations/instances_{train,val}2017.json, train2017/, val2017/, ADE20K with images/
           and annotations/), needed by the stages that read them.
           ARCH     config size (crossmae.models.sizes: small, base, large, huge; default: read
                    from the checkpoint's encoder)
           NPROC    processes (GPUs) per node (default: the GPUs nvidia-smi lists, else 1; with
                    LAUNCHER=slurm, 8)
           NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun (run this on every
                    node with the same OUT on a shared filesystem)
           LAUNCHER torchrun (default) | slurm: each stage becomes a Slurm job through
                    tools/submit.py (submitit), waited for; SLURM_ARGS adds its options
                    (e.g. "--partition learn --timeout-min 4320")
           <STAGE>_ARGS  extra key=value settings of a stage (LINPROBE_ARGS, DET_ARGS, ...)
           PYTHON   the interpreter the stages run with (default: this one)
OUT defaults to the checkpoint's folder + /transfer (--curve: the run folder + /curve). A stage
whose final results.json exists is skipped; one that was interrupted resumes from its last
checkpoint (--resume auto). Stage logs: OUT/<stage>.log. Exit status 1 if any stage did not
finish, 2 on a setting to change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checks import int_at_least
from ..config import ConfigError
from ..task import register_command, transfer_stages
from .stages import encoder_size, evaluate_checkpoint, make_plans, stage_configs


@register_command(("transfer",), help="transfer evaluation of a checkpoint: every stage, one "
                  "table (tools/transfer.sh)", description=__doc__)  # fmt: skip
def _transfer_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a pretraining checkpoint or encoder export "
                   "(--curve: a pretraining run's folder)")  # fmt: skip
    p.add_argument("out", nargs="?", help="output folder (default: beside the checkpoint)")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps on the shared data")
    p.add_argument("--stages", default=None, help='a subset, e.g. "linprobe seg"')
    p.add_argument("--config", action="append", default=[], metavar="STAGE=FILE",
                   help="a stage's config file, not its per-size one (repeatable)")  # fmt: skip
    p.add_argument("--curve", action="store_true", help="evaluate every kept checkpoint of the "
                   "run folder: OUT/curve.md, curve.json, curve.png")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="--curve: look again every --poll "
                   "seconds until the run's final checkpoint is evaluated")  # fmt: skip
    p.add_argument("--poll", type=int_at_least(1), default=60, help="--watch's interval (s)")
    p.add_argument("--list", action="store_true", help="list the registered stages and exit")
    p.set_defaults(func=cmd_transfer)


def cmd_transfer(args: argparse.Namespace) -> int:
    stages = {t.transfer.name: t for t in transfer_stages()}
    if args.list:
        for name, task in stages.items():
            t = task.transfer
            runs = ", ".join(w for w, on in (("default", t.default), ("curve", t.curve)) if on)
            print(f"{name:10s} crossmae {' '.join(task.command):16s} {t.config:48s} "
                  f"{' '.join(t.datasets):10s} {runs}")  # fmt: skip
        return 0
    role = "curve" if args.curve else "default"
    chosen = (args.stages.split() if args.stages is not None
              else [n for n, t in stages.items() if getattr(t.transfer, role)])  # fmt: skip
    unknown = [s for s in chosen if s not in stages]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}' ({' '.join(stages)})")
    if args.watch and not args.curve:
        raise ConfigError("--watch follows a run folder: use it with --curve")
    if not args.checkpoint:
        raise ConfigError("name the checkpoint to evaluate (see --help)")
    configs = stage_configs(args.config, chosen)
    tasks = [stages[s] for s in chosen]
    if args.curve:
        from .curve import run_curve

        return run_curve(args, tasks, configs)
    ckpt = Path(args.checkpoint).resolve()
    if not ckpt.is_file():
        raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
    if args.smoke:  # refused at once, as without --smoke (whose configs need its size)
        encoder_size(ckpt)
    out = Path(args.out or ckpt.parent / ("transfer-smoke" if args.smoke else "transfer"))
    out = out.resolve()
    plans = make_plans(tasks, ckpt, out, configs, smoke=args.smoke)
    return evaluate_checkpoint(ckpt, out, plans, smoke=args.smoke)
