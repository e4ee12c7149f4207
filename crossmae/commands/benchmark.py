"""Benchmarks: the pretraining step (img/s, step time, peak memory, FLOPs, MFU) and the image
pipeline (decoded + augmented images per second).

    # training step, real sizes, on a GPU (one JSON line per run, then a table)
    crossmae benchmark step --models crossmae_vit_base_patch16 mae_vit_base_patch16 \
        --pred-ratios 0.25 0.75 --batch 256 --modes eager compiled
    # forward + backward replayed as one CUDA graph (what train.cuda_graph=true runs), compiled
    crossmae benchmark step --models crossmae_vit_base_patch16 --pred-ratios 0.25 \
        --modes graphed
    # attention kernels (fwd + bwd) at the encoder's and decoder's shapes, per SDPA backend
    crossmae benchmark attention --batch 256
    # the same at a tiny size on CPU (what CI runs)
    crossmae benchmark step --tiny --batch 8 --steps 3 --warmup 1
    # what the compiled step keeps for backward, at any size, on CPU, without running it
    crossmae benchmark saved --models crossmae_vit_base_patch16 --batch 256 \
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
import contextlib
import gc
import itertools
import json
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from crossmae import create_model
from crossmae.bench import bench_cases
from crossmae.checkpoint import strict_json
from crossmae.config import ConfigError, int_at_least
from crossmae.engine import Engine, StepOptions
from crossmae.models import CrossMAE, model_class
from crossmae.models.layers import (
    SDPA_BACKENDS,
    sdpa_backend,
    sdpa_device_problem,
    set_attention_backend,
)
from crossmae.pretrain import pretrain_losses
from crossmae.task import register_command, register_group

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_num_heads=2, decoder_depth=2)  # fmt: skip

# the official code on one H100, torch 2.11, batch 256 ViT-B, AdamW included (docs/reference.md)
OFFICIAL_H100 = {
    ("mae_vit_base_patch16", None, "fp16 eager"): 2962,
    ("crossmae_vit_base_patch16", 0.75, "fp16 eager"): 2199,
    ("crossmae_vit_base_patch16", 0.25, "fp16 eager"): 2686,
    ("crossmae_vit_base_patch16", 0.25, "bf16 eager"): 2882,
    ("crossmae_vit_base_patch16", 0.25, "bf16 compiled"): 4456,
}


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


def step_flops(model, imgs: torch.Tensor, ids: torch.Tensor) -> int:
    """FLOPs of one eager forward + backward. Nothing of its autograd graph outlives the call: a
    graph kept alive would pin the parameters' gradient accumulation to the default stream, which
    a later CUDA-graph capture cannot use."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
            loss = model(imgs, ids_shuffle=ids)["loss"]
        loss.backward()
    return counter.get_total_flops()


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


def bench_step(
    name: str, pred_ratio: float | None, mode: str, budget: float, args, device: torch.device
) -> dict:
    """Time the training engine's own step (forward + backward + AdamW, bf16 autocast, the
    non-finite check) on one model configuration."""
    model = build(name, pred_ratio, args, device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    size = model.grid_size[0] * model.patch_size
    imgs = synthetic_images(args, size, device)
    masks = [model.mask_sampler(args.batch, device) for _ in range(4)]
    if mode == "graphed" and device.type != "cuda":
        raise ValueError("--modes graphed needs a CUDA device")
    flops_per_img = step_flops(model, imgs, masks[0]) / args.batch
    opt.zero_grad(set_to_none=True)
    # the graph's input buffer is imgs itself (the loop copies each prefetched batch into it)
    batches = itertools.cycle([{"imgs": imgs, "ids_shuffle": m.clone()} for m in masks])
    step_fns = SimpleNamespace(inputs=lambda batch, device: batch,
                               losses=partial(pretrain_losses, budget=budget))  # fmt: skip
    options = StepOptions(precision="bf16", grad_norm_every=10**9, cuda_graph=mode == "graphed",
                          compile=args.compile_mode if mode != "eager" else False)  # fmt: skip
    engine = Engine(model, opt, None, lambda s: 1e-4, step_fns, steps=args.warmup + args.steps,
                    device=device, options=options)  # fmt: skip
    engine.prepare()

    def step(i: int) -> None:
        engine.train_step(batches)

    if device.type == "cuda":
        # graphed: the peak is taken over the capture too (the first step captures, before
        # AdamW's state exists, as in training): what the graph's private pool allocates then
        # counts as allocated, and between replays it does not
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    sync(device)
    if device.type == "cuda" and mode != "graphed":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync(device)
    dt = (time.perf_counter() - t) / args.steps
    if args.profile:
        print_profile(step, device, f"{name} γ={pred_ratio} {mode}", args.profile)
    rec = step_record(model, name, mode, budget, args, device, dt, flops_per_img)
    rec["loss"] = float(engine.last_parts["loss"])
    return rec


def step_record(model, name: str, mode: str, budget: float, args, device: torch.device,
                dt: float, flops_per_img: float) -> dict:  # fmt: skip
    """One row of ``benchmark step``: the configuration, speed, memory, FLOPs, MFU and the
    official code's speed on the same configuration."""
    rec = {
        "model": name,
        "tiny": args.tiny,
        "pred_ratio": getattr(model, "pred_ratio", None),
        "decoder_depth": len(model.decoder.blocks),
        "decoder_path": "plain" if args.plain_decoder else "fused",
        "grad_checkpointing": args.grad_checkpointing,
        "mode": f"bf16 {mode}",
        "compile_mode": args.compile_mode if mode != "eager" else None,
        "sdpa": args.sdpa,
        "inductor": args.inductor_settings if mode != "eager" else {},
        "memory_budget": budget if mode != "eager" else None,
        "batch": args.batch,
        "input": args.input,
        "img_per_s": args.batch / dt,
        "step_ms": dt * 1e3,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        # what the allocator holds, CUDA-graph pools included
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30
        if device.type == "cuda"
        else None,
        "gflop_per_img": flops_per_img / 1e9,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if args.peak_tflops:
        rec["mfu"] = rec["img_per_s"] * flops_per_img / (args.peak_tflops * 1e12)
    # graphed (compiled + CUDA graph) is compared with the official code's best, compiled
    official_mode = "bf16 compiled" if mode == "graphed" else rec["mode"]
    official = not args.plain_decoder and OFFICIAL_H100.get(
        (name, rec["pred_ratio"] if isinstance(model, CrossMAE) else None, official_mode)
    )
    if official and not args.tiny:
        rec["official_h100_img_per_s"] = official
    return rec


def print_profile(step, device: torch.device, title: str, path: str) -> None:
    """Kernel time table of 5 steps (torch.profiler), printed and appended to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for i in range(5):
            step(i)
        sync(device)
    # by kernel time spent in the op itself: the kernels, not the regions that contain them;
    # then the same by input shapes, which tells the matmuls and reductions apart
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
    shapes = prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=60, max_name_column_width=40, max_shapes_column_width=70
    )
    text = f"## profile: {title}, 5 steps\n{table}\n## by input shapes\n{shapes}\n"
    print(text, flush=True)
    with open(path, "a") as f:
        f.write(text)


class _Partitioned(Exception):
    """Raised once the forward graph is cut: ``saved_for_backward`` has what it needs."""


def _caused_by(e: BaseException | None, kind: type) -> bool:
    while e is not None:
        if isinstance(e, kind):
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__
    return False


def producer(node) -> str:
    """The op that made a graph value, looking through views: ``addmm``, ``gelu``,
    ``native_layer_norm[0]`` (one output of several), ``input`` (a parameter or input)."""
    views = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze",
             "squeeze", "slice", "alias", "detach", "unbind", "split", "select",
             "reshape"}  # fmt: skip

    def name(n) -> str:
        return getattr(n.target, "__name__", str(n.target)).split(".")[0]

    while node.op == "call_function" and node.args and hasattr(node.args[0], "op"):
        if name(node) == "getitem" and name(node.args[0]) not in views:
            return f"{producer(node.args[0])}[{node.args[1]}]"
        if name(node) not in views | {"getitem"}:
            return name(node)
        node = node.args[0]
    return "input" if node.op == "placeholder" else name(node)


def saved_for_backward(model, imgs: torch.Tensor, ids: torch.Tensor) -> dict:
    """What the compiled training step keeps from forward for backward, found without running
    it: the forward (bf16 autocast) goes through ``torch.compile``'s Inductor pipeline as the step
    does (its decompositions, its joint-graph passes, its call of the min-cut partitioner with the
    functorch settings in effect, e.g. ``activation_memory_budget``), and stops once the graph is
    cut. The cut forward graph's extra outputs are the saved tensors. Compilation caches are off
    for the call, so the partitioner always runs. Returns ``saved``, a list of {bytes, dtype,
    shape, producer} (a storage shared by several is counted once; parameters and inputs, alive
    anyway, count 0), and ``output_bytes``, the forward's own outputs.

    The step compiles as one graph (``tests/test_fast_path.py``). On CPU, autocast keeps some ops
    in bf16 that CUDA's runs in fp32 (the model's LayerNorms are fp32 on both), so a CPU cut can
    still differ from the CUDA one in detail."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.custom_graph_pass import CustomPartitionerFn
    from torch.multiprocessing.reductions import StorageWeakRef

    found = {}

    def nbytes(v: torch.Tensor) -> int:
        return v.untyped_storage().nbytes()

    class Recorder(CustomPartitionerFn):
        """Inductor's own partitioner, then a record of the cut and a stop (Inductor's hook for
        replacing the partitioner: its config's ``custom_partitioner_fn``)."""

        def __call__(self, joint, joint_inputs, **kw):
            fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
            record(joint, joint_inputs, fw, bw, num_fwd_outputs=kw["num_fwd_outputs"])
            raise _Partitioned

        def uuid(self):
            return None  # never cached

    def record(joint, joint_inputs, fw, bw, *, num_fwd_outputs: int) -> None:
        (outputs,) = next(n for n in fw.graph.nodes if n.op == "output").args
        values = [n.meta.get("val") for n in outputs]
        found["output_bytes"] = sum(
            nbytes(v) for v in values[:num_fwd_outputs] if isinstance(v, torch.Tensor)
        )
        # the graph's inputs (parameters, images) live anyway: not counted
        seen = {StorageWeakRef(v.untyped_storage()) for v in joint_inputs[0]
                if isinstance(v, torch.Tensor)}  # fmt: skip
        saved = []
        for node, v in zip(outputs[num_fwd_outputs:], values[num_fwd_outputs:], strict=True):
            if not isinstance(v, torch.Tensor):
                continue  # symbolic sizes
            storage = StorageWeakRef(v.untyped_storage())
            saved.append({"bytes": 0 if storage in seen else nbytes(v),
                          "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                          "producer": producer(node)})  # fmt: skip
            seen.add(storage)
        found["saved"] = saved

    torch._dynamo.reset()
    try:
        with (
            torch._inductor.config.patch(fx_graph_cache=False, custom_partitioner_fn=Recorder()),
            functorch_config.patch(enable_autograd_cache=False),
            torch.autocast(imgs.device.type, dtype=torch.bfloat16, cache_enabled=False),
        ):
            torch.compile(model)(imgs, ids_shuffle=ids, with_pred=False)
    except Exception as e:  # Dynamo wraps what a backend raises
        if not _caused_by(e, _Partitioned):
            raise
    finally:
        torch._dynamo.reset()
    if "saved" not in found:
        raise RuntimeError(
            "the compiled forward was never partitioned: no parameter needs grad, or this torch's "
            "Inductor does not call its config's custom_partitioner_fn"
        )
    return found


def model_device(args) -> torch.device:
    """The device of ``step`` and ``saved``: ``--device``, else CUDA when there is one; a CUDA-only
    attention kernel elsewhere fails here, named, and so does a wrong ``--inductor`` setting
    (read into ``args.inductor_settings``), before any row runs."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if problem := sdpa_device_problem(args.sdpa, device.type):
        raise ValueError(f"--sdpa {problem}")
    args.inductor_settings = inductor_settings(args.inductor)
    return device


def cmd_saved(args) -> int:
    device = model_device(args)
    for name in args.models:
        for g in args.pred_ratios if issubclass(model_class(name), CrossMAE) else [None]:
            model = build(name, g, args, device)
            size = model.grid_size[0] * model.patch_size
            imgs = synthetic_images(args, size, device)
            ids = model.mask_sampler(args.batch, device)
            for budget in args.memory_budget:
                with compile_settings(args, budget):
                    found = saved_for_backward(model, imgs, ids)
                groups = {}
                for t in found["saved"]:
                    key = (t["producer"], t["dtype"], tuple(t["shape"]))
                    n, b = groups.get(key, (0, 0))
                    groups[key] = (n + 1, b + t["bytes"])
                top = sorted(groups.items(), key=lambda kv: -kv[1][1])[: args.top]
                rec = {
                    "model": name, "tiny": args.tiny,
                    "pred_ratio": getattr(model, "pred_ratio", None), "batch": args.batch,
                    "input": args.input,
                    "memory_budget": budget, "sdpa": args.sdpa, "inductor": args.inductor_settings,
                    "device": device.type, "torch": torch.__version__,
                    "saved_tensors": len(found["saved"]),
                    "saved_gib": sum(t["bytes"] for t in found["saved"]) / 2**30,
                    "output_gib": found["output_bytes"] / 2**30,
                    "largest": [{"producer": p, "dtype": d, "shape": list(shape), "count": n,
                                 "mib": b / 2**20} for (p, d, shape), (n, b) in top],
                }  # fmt: skip
                print(strict_json(rec), flush=True)
                print(f"# {name} γ={rec['pred_ratio']} batch {args.batch}, memory budget {budget:g}"
                      f" ({device.type}): {rec['saved_tensors']} tensors, "
                      f"{rec['saved_gib'] * 1024:.1f} MiB saved for backward; forward outputs "
                      f"{rec['output_gib'] * 1024:.1f} MiB")  # fmt: skip
                for r in rec["largest"]:
                    print(f"#   {r['mib']:9.1f} MiB  {r['count']:3d} x {r['dtype']:8s} "
                          f"{str(tuple(r['shape'])):24s} {r['producer']}")  # fmt: skip
    return 0


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


def cmd_step(args) -> int:
    device = model_device(args)
    if args.peak_tflops is None:
        args.peak_tflops = matmul_peak_tflops(device)
    rows = []
    for name in args.models:
        ratios = args.pred_ratios if issubclass(model_class(name), CrossMAE) else [None]
        for g in ratios:
            for mode, budget in itertools.product(args.modes, args.memory_budget):
                if mode == "eager" and budget != args.memory_budget[0]:
                    continue  # the budget is the compiled step's
                with compile_settings(args, budget):
                    rec = bench_step(name, g, mode, budget, args, device)
                torch._dynamo.reset()  # free this model before the next one's peak is measured
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rec["peak_tflops"] = args.peak_tflops
                print(strict_json(rec), flush=True)
                rows.append(rec)
                if args.out:  # line by line: a run cut short keeps what it measured
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    # GiB: peak allocated (graphed: over the capture, when the graph's private pool counts as
    # allocated); held: peak reserved by the allocator, cached blocks included
    print(f"\n{'model':45s} {'γ':>5s} {'mode':22s} {'img/s':>8s} {'ms':>7s} {'GiB':>6s} "
          f"{'held':>6s} {'GFLOP/img':>9s} {'MFU':>6s}  official")  # fmt: skip
    for r in rows:
        mem, held = (
            (f"{r['peak_mem_gib']:.1f}", f"{r['peak_reserved_gib']:.1f}")
            if r["peak_mem_gib"] is not None
            else ("-", "-")
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        g = f"{r['pred_ratio']:.2f}" if r["pred_ratio"] is not None else "-"
        name = r["model"] + (" (tiny)" if r["tiny"] else "")
        name += f" d{r['decoder_depth']}"
        name += " plain" if r["decoder_path"] == "plain" and r["pred_ratio"] is not None else ""
        name += " ckpt" if r["grad_checkpointing"] else ""
        name += f" {r['sdpa']}" if r["sdpa"] != "auto" else ""
        name += " +inductor" if r["inductor"] else ""
        name += f" budget {r['memory_budget']:g}" if r["memory_budget"] not in (None, 1.0) else ""
        mode = r["mode"] + (
            f" {r['compile_mode']}" if r["compile_mode"] not in (None, "default") else ""
        )
        official = r.get("official_h100_img_per_s", "")
        print(
            f"{name:45s} {g:>5s} {mode:22s} {r['img_per_s']:8.0f} {r['step_ms']:7.1f} "
            f"{mem:>6s} {held:>6s} {r['gflop_per_img']:9.3f} {mfu:>6s}  {official}"
        )
    return 0


def cmd_tasks(args) -> int:
    """The registered tasks' training step (the engine's, at each recipe's precision and size:
    each task's case in ``crossmae.bench``) and their evaluation throughput: img/s, step ms,
    peak memory, FLOPs per image and MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = args.peak_tflops or matmul_peak_tflops(device)
    cases = bench_cases()
    for name in args.tasks or list(cases):
        if name not in cases:
            raise ConfigError(f"--tasks {name}: no benchmark case is registered for it (cases: "
                              f"{', '.join(cases)})")  # fmt: skip
        case = cases[name](args.tiny, args.batch, device)
        params = [p for p in case.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        options = StepOptions(precision=case.precision, grad_norm_every=10**9,
                              compile=args.compile)  # fmt: skip
        engine = Engine(case.model, opt, None, lambda s: 1e-4, case.task, steps=10**9,
                        device=device, options=options)  # fmt: skip
        engine.prepare()
        batches = itertools.repeat(case.batch)
        with FlopCounterMode(display=False) as counter:
            engine.train_step(batches)
        flops = counter.get_total_flops() / case.images
        dt = timed(partial(engine.train_step, batches), args.warmup, args.steps, device)
        cuda = device.type == "cuda"
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        case.model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=args.eval_bf16):  # fmt: skip
            eval_s = timed(case.evaluate, 1, args.steps, device)
        rec = {"task": name, "tiny": args.tiny, "batch": case.images, "precision": case.precision,
               "compile": args.compile, "img_per_s": case.images / dt, "step_ms": dt * 1e3,
               "gflop_per_img": flops / 1e9, "eval_img_per_s": case.eval_images / eval_s,
               "peak_mem_gib": peak_mem, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if cuda else "cpu"}  # fmt: skip
        if peak:
            rec["mfu"] = rec["img_per_s"] * flops / (peak * 1e12)
        print(strict_json(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        del engine, case, opt
        gc.collect()
    return 0


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


def cmd_attention(args) -> int:
    """Forward + backward of each SDPA backend at the attention shapes of a ViT-B step (mask ratio
    0.75: 50 encoder tokens with cls; CrossMAE γ=0.25: 49 queries; MAE: 197 decoder tokens).
    q, k, v are head-transposed views of (B, tokens, heads, head_dim), as the model makes them."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {  # label: heads, queries, keys, head_dim
        "encoder self-attention": (12, 50, 50, 64),
        "CrossMAE decoder cross-attention": (16, 49, 50, 32),
        "MAE decoder self-attention": (16, 197, 197, 32),
    }
    fastest = {}
    for label, (h, nq, nk, d) in shapes.items():
        q, k, v = (
            torch.randn(args.batch, n, h, d, device=device, dtype=dtype).transpose(1, 2)
            for n in (nq, nk, nk)
        )
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        times = {}
        for backend in SDPA_BACKENDS:
            try:
                with sdpa_backend(backend):
                    for i in range(args.warmup + args.iters):
                        if i == args.warmup:
                            sync(device)
                            t = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v).sum().backward()
                    sync(device)
                times[backend] = (time.perf_counter() - t) / args.iters * 1e3
            except RuntimeError as e:  # the backend does not take this shape / dtype / device
                print(strict_json({"shape": label, "sdpa": backend, "unsupported": str(e)[:120]}))
                continue
            rec = {"shape": label, "batch": args.batch, "heads": h, "queries": nq, "keys": nk,
                   "head_dim": d, "dtype": str(dtype), "sdpa": backend,
                   "fwd_bwd_ms": times[backend]}  # fmt: skip
            print(strict_json(rec), flush=True)
        named = {b: ms for b, ms in times.items() if b != "auto"}
        fastest[label] = min(named, key=named.get) if named else None
    print(strict_json({"fastest": fastest}))
    return 0


def cmd_data(args) -> int:

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return data_rates(args)
    finally:
        torch.set_num_threads(threads)


def data_rates(args) -> int:
    """``cmd_data``'s measurements (one thread, as a worker)."""
    from crossmae.data import ImageFiles, PretrainSamples, PretrainTransform, sample_seed
    from crossmae.models.masking import MaskSampler

    source = ImageFiles(args.folder)
    n = min(args.images, len(source))
    keys = [(i, sample_seed(0, 0, i)) for i in range(n)]
    grid = (args.img_size // 16, args.img_size // 16)
    # what pretraining runs (uint8 crops, normalised on the device), then the same crops
    # normalised to fp32 in the worker (what the official pipeline does)
    for normalize in (False, True):
        ds = PretrainSamples(
            source, PretrainTransform(args.img_size, normalize=normalize), MaskSampler(grid)
        )
        ds[keys[0]]  # warm the file cache and imports
        t = time.perf_counter()
        for k in keys:
            ds[k]
        cpu_rate = n / (time.perf_counter() - t)
        output = "normalised fp32" if normalize else "uint8"
        rec = {"pipeline": f"cpu decode + RRC + flip (PIL), {output}", "images": n,
               "img_size": args.img_size, "img_per_s_per_worker": cpu_rate,
               "folder": args.folder}  # fmt: skip
        print(strict_json(rec))
    if torch.cuda.is_available() and not args.no_gpu:
        from crossmae.data.gpu import JpegSamples, collate_raw, decode_batch

        device = torch.device("cuda")
        raw = JpegSamples(source, args.img_size, MaskSampler(grid))
        batches = [
            collate_raw([raw[k] for k in keys[i : i + args.batch]]) for i in range(0, n, args.batch)
        ]
        decode_batch(batches[0], args.img_size, device)  # warm-up (nvjpeg init)
        sync(device)
        t = time.perf_counter()
        for b in batches:
            decode_batch(b, args.img_size, device)
        sync(device)
        rate = n / (time.perf_counter() - t)
        rec = {"pipeline": "GPU decode_jpeg + RRC + flip", "images": n, "img_size": args.img_size,
               "img_per_s": rate, "device": torch.cuda.get_device_name()}  # fmt: skip
        print(strict_json(rec))
    return 0


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
    p.add_argument("--sdpa", choices=SDPA_BACKENDS, default="auto",
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
    p.set_defaults(func=cmd_step)


@register_command(("benchmark", "saved"),
                  help="what the compiled step keeps for backward (no step is run)")  # fmt: skip
def _saved_command(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--top", type=int_at_least(1), default=15, help="largest groups listed per row")
    p.set_defaults(func=cmd_saved)


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
    p.set_defaults(func=cmd_tasks)


@register_command(("benchmark", "attention"), help="SDPA backends at the model's attention shapes")
def _attention_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int_at_least(1), default=256, help="sequences per call")
    p.add_argument("--iters", type=int_at_least(1), default=20, help="timed calls")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed calls first")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.set_defaults(func=cmd_attention)


@register_command(("benchmark", "data"), help="image pipeline throughput")
def _data_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", required=True, type=str, help="an image folder (JPEGs)")
    p.add_argument("--images", type=int_at_least(1), default=300, help="images timed")
    p.add_argument("--img-size", type=int_at_least(16), default=224, help="crop side")
    p.add_argument("--batch", type=int_at_least(1), default=64, help="GPU-decode batch")
    p.add_argument("--no-gpu", action="store_true", help="leave out the GPU-decode path")
    p.set_defaults(func=cmd_data)
