"""``crossmae benchmark step``: the pretraining step (img/s, step time, peak memory, FLOPs,
MFU) per model, prediction ratio, mode and activation memory budget, beside the official
code's speed on the same configuration."""

from __future__ import annotations

import gc
import itertools
import json
import time
from functools import partial
from types import SimpleNamespace

import torch

from crossmae.checkpoint import strict_json
from crossmae.engine import Engine, StepOptions
from crossmae.models import CrossMAE, model_class
from crossmae.pretrain import pretrain_losses

from .common import (
    build,
    compile_settings,
    matmul_peak_tflops,
    model_device,
    sync,
    synthetic_images,
)

# the official code on one H100, torch 2.11, batch 256 ViT-B, AdamW included (docs/reference.md)
OFFICIAL_H100 = {
    ("mae_vit_base_patch16", None, "fp16 eager"): 2962,
    ("crossmae_vit_base_patch16", 0.75, "fp16 eager"): 2199,
    ("crossmae_vit_base_patch16", 0.25, "fp16 eager"): 2686,
    ("crossmae_vit_base_patch16", 0.25, "bf16 eager"): 2882,
    ("crossmae_vit_base_patch16", 0.25, "bf16 compiled"): 4456,
}


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


def cmd_step(args) -> int:
    device = model_device(args)
    if device.type == "cpu":
        print("# on a CPU: the step runs under bf16 autocast, which most CPUs emulate (pretraining "
              "runs fp32 there): these rows show that the step runs and what it counts, not how "
              "fast pretraining is on this machine (the log of crossmae pretrain says that)",
              flush=True)  # fmt: skip
    if args.peak_tflops is None:
        args.peak_tflops = matmul_peak_tflops(device)
    rows = []
    for name in args.models:
        ratios = args.pred_ratios if issubclass(model_class(name), CrossMAE) else [None]
        for g in ratios:
            for mode, budget in itertools.product(args.modes, args.memory_budget):
                if mode == "eager" and budget != args.memory_budget[0]:
                    continue  # the budget is the compiled step's
                print(f"# timing {name} γ={g} {mode}: {args.warmup} warm-up and {args.steps} "
                      "timed steps" + (" (compiling first)" if mode != "eager" else ""),
                      flush=True)  # fmt: skip
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
