"""What the pretraining-step benchmarks share: the row's model, its synthetic batch, the
device, compilation settings and timing."""

from __future__ import annotations

import contextlib
import time

import torch
import torch._functorch.config as functorch_config

from crossmae import create_model
from crossmae.models import CrossMAE
from crossmae.models.layers import sdpa_device_problem, set_attention_backend

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_num_heads=2, decoder_depth=2)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device) -> float | None:
    """Measured dense bf16 matmul throughput of the card (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * 8192**3 * n / (time.perf_counter() - t) / 1e12


def build(name: str, pred_ratio: float | None, args, device: torch.device):
    """The model of one benchmark row, in training mode on ``device``."""
    kw = dict(TINY) if args.tiny else {}
    if args.decoder_depth is not None:
        kw["decoder_depth"] = args.decoder_depth
    torch.manual_seed(0)
    model = create_model(name, **kw)
    if isinstance(model, CrossMAE) and pred_ratio is not None:
        model.pred_ratio = pred_ratio
    model.encoder.grad_checkpointing = args.grad_checkpointing
    if args.plain_decoder:
        model.decoder.fused = False  # CrossMAE only: per-block LayerNorm + K/V projection
    set_attention_backend(model, args.sdpa)
    return model.to(device).train()


def synthetic_images(args, size: int, device: torch.device) -> torch.Tensor:
    """The step's input batch: uint8 pixels, as the training loop's CPU-decode pipeline delivers
    them (the model normalises them inside the step), or ``--input float``: normalised fp32
    images, the official code's input."""
    shape = (args.batch, 3, size, size)
    if args.input == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return torch.randn(shape, device=device)


def compile_settings(args, budget: float) -> contextlib.ExitStack:
    """Inductor overrides and the activation memory budget, in effect while a row compiles; both
    are part of the compilation caches' keys, so no cached compilation of other settings is
    reused."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(args.inductor_settings))
    stack.enter_context(functorch_config.patch(activation_memory_budget=budget))
    return stack


def inductor_settings(pairs: list[str]) -> dict:
    """``["triton.mix_order_reduction_split_size=64", ...]`` -> Inductor config overrides, values
    read as Python literals; a name Inductor does not have fails here, before anything runs."""
    import ast

    import torch._inductor.config as inductor_config

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--inductor takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--inductor {key}: {value!r} is not a Python literal") from None
    try:
        with inductor_config.patch(out):
            pass
    except AttributeError as e:
        raise ValueError(f"--inductor: {e}") from None
    return out


def model_device(args) -> torch.device:
    """The device of ``step`` and ``saved``: ``--device``, else CUDA when there is one; a CUDA-only
    attention kernel elsewhere fails here, named, and so does a wrong ``--inductor`` setting
    (read into ``args.inductor_settings``), before any row runs."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if problem := sdpa_device_problem(args.sdpa, device.type):
        raise ValueError(f"--sdpa {problem}")
    args.inductor_settings = inductor_settings(args.inductor)
    return device


def timed(fn, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` (peak memory counted
    from the timed calls on)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps
