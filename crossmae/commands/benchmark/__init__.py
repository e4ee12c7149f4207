"""Benchmarks: the pretraining step (img/s, step time, peak memory, FLOPs, MFU) and the image
pipeline (decoded + augmented images per second).

    # training step, real sizes, on a GPU (one JSON line per run, then a table)
    crossmae benchmark step --models crossmae_vit_base_patch16 mae_vit_base_patch16 \\
        --pred-ratios 0.25 0.75 --batch 256 --modes eager compiled
    # forward + backward replayed as one CUDA graph (what train.cuda_graph=true runs), compiled
    crossmae benchmark step --models crossmae_vit_base_patch16 --pred-ratios 0.25 \\
        --modes graphed
    # attention kernels (fwd + bwd) at the encoder's and decoder's shapes, per SDPA backend
    crossmae benchmark attention --batch 256
    # the same at a tiny size on CPU (what CI runs)
    crossmae benchmark step --tiny --batch 8 --steps 3 --warmup 1
    # what the compiled step keeps for backward, at any size, on CPU, without running it
    crossmae benchmark saved --models crossmae_vit_base_patch16 --batch 256 \\
        --memory-budget 1.0 0.9
    # image pipeline: CPU decode + RandomResizedCrop per worker, and the GPU decode path
    crossmae benchmark data --folder ../shared/data/imagenette/train --images 300

Synthetic images and masks live on the device before timing starts (the images as uint8 pixels,
normalised inside the step as in pretraining; ``--input float``: normalised fp32 images, the
official code's input); a step is forward + backward + AdamW (fused on CUDA) under bf16
autocast. Modes: ``eager``; ``compiled`` (``torch.compile``, ``--compile-mode``); ``graphed``
(compiled, and forward + backward captured as one CUDA graph by
``crossmae.cuda_graph.GraphedStep``, the optimizer step eager after it, as in training). FLOPs
per image are counted with ``torch.utils.flop_counter`` on one step; MFU divides achieved FLOP/s
by the card's measured bf16 matmul peak (an 8192^3 product), or by ``--peak-tflops``.
``--memory-budget`` sets torch's ``activation_memory_budget`` for the compiled step (1.0: the
partitioner's fastest choice; lower: recompute more in backward, save less); ``saved`` lists what
that choice keeps from forward for backward (``saved_for_backward``).
"""

from __future__ import annotations

import argparse
import importlib

from crossmae.checks import int_at_least
from crossmae.task import register_command, register_group

# the names of crossmae.models.layers.SDPA_BACKENDS, here so that building the command line
# imports no torch (tests/test_bench.py checks that the two agree)
SDPA_NAMES = ("auto", "flash", "efficient", "cudnn", "math")


def _run(module: str, name: str):
    """The function ``name`` of the subcommand's module, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(args)

    return run


def budget_value(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a memory budget is in [0, 1], got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model of each row and how it is compiled (``step`` and ``saved``)."""
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   default=["crossmae_vit_base_patch16", "mae_vit_base_patch16"],
                   help="registered models, one row each (crossmae models lists them)")  # fmt: skip
    p.add_argument("--pred-ratios", nargs="+", type=float, default=[0.25, 0.75], metavar="γ",
                   help="CrossMAE prediction ratios, one row each (MAE predicts every masked "
                   "patch)")  # fmt: skip
    p.add_argument("--decoder-depth", type=int_at_least(1), default=None,
                   help="decoder blocks (default: the model's)")  # fmt: skip
    p.add_argument("--sdpa", choices=SDPA_NAMES, default="auto",
                   help="attention kernel of every layer (auto: torch's choice)")  # fmt: skip
    p.add_argument(
        "--inductor",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Inductor config overrides, e.g. triton.mix_order_reduction_split_size=64",
    )
    p.add_argument(
        "--memory-budget",
        nargs="+",
        type=budget_value,
        default=[1.0],
        help="activation memory budgets of the compiled step, one row each (1.0 = torch's default)",
    )
    p.add_argument("--batch", type=int_at_least(1), default=256, help="images per step")
    p.add_argument(
        "--input",
        choices=["uint8", "float"],
        default="uint8",
        help="the step's images: uint8 pixels as pretraining feeds them, or normalised fp32",
    )
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU / CI)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the encoder blocks in backward (less memory)")  # fmt: skip
    p.add_argument(
        "--plain-decoder", action="store_true", help="CrossMAE: the unfused per-block K/V path"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")


register_group(("benchmark",), "training-step, attention and data-pipeline speed", __doc__)


@register_command(("benchmark", "step"), help="training-step throughput")
def _step_command(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["eager", "compiled", "graphed"],
        default=["eager", "compiled"],
        help="graphed = compiled + forward/backward as one CUDA graph (GPU only)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (reduce-overhead = CUDA graphs)",
    )
    p.add_argument("--steps", type=int_at_least(1), default=20, help="timed steps")
    p.add_argument("--warmup", type=int_at_least(0), default=5,
                   help="untimed steps first (compilation, allocator)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None, help="default: measured (GPU only)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--profile", default=None, help="append a kernel-time table of 5 steps here")
    p.set_defaults(func=_run("step", "cmd_step"))


@register_command(("benchmark", "saved"),
                  help="what the compiled step keeps for backward (no step is run)")  # fmt: skip
def _saved_command(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--top", type=int_at_least(1), default=15, help="largest groups listed per row")
    p.set_defaults(func=_run("saved", "cmd_saved"))


@register_command(("benchmark", "tasks"),
                  help="the tasks' training step and evaluation throughput")  # fmt: skip
def _tasks_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="registered tasks with a benchmark case (default: all)")  # fmt: skip
    p.add_argument(
        "--batch", type=int_at_least(1), default=None, help="default: each recipe's per GPU"
    )
    p.add_argument("--steps", type=int_at_least(1), default=10, help="timed steps")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-bf16", action="store_true", help="evaluate under bf16 autocast")
    p.add_argument("--tiny", action="store_true", help="tiny widths and sizes (CPU / CI)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: measured (GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.set_defaults(func=_run("tasks", "cmd_tasks"))


@register_command(("benchmark", "attention"), help="SDPA backends at the model's attention shapes")
def _attention_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int_at_least(1), default=256, help="sequences per call")
    p.add_argument("--iters", type=int_at_least(1), default=20, help="timed calls")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed calls first")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.set_defaults(func=_run("attention", "cmd_attention"))


@register_command(("benchmark", "data"), help="image pipeline throughput")
def _data_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", required=True, type=str, help="an image folder (JPEGs)")
    p.add_argument("--images", type=int_at_least(1), default=300, help="images timed")
    p.add_argument("--img-size", type=int_at_least(16), default=224, help="crop side")
    p.add_argument("--batch", type=int_at_least(1), default=64, help="GPU-decode batch")
    p.add_argument("--no-gpu", action="store_true", help="leave out the GPU-decode path")
    p.set_defaults(func=_run("data", "cmd_data"))
