"""``crossmae benchmark tasks``: each registered task's training step and evaluation
throughput (its case in ``crossmae.bench``)."""

from __future__ import annotations

import gc
import itertools
import json
from functools import partial

import torch

from crossmae.bench import bench_cases
from crossmae.checkpoint import strict_json
from crossmae.config import ConfigError
from crossmae.engine import Engine, StepOptions

from .common import matmul_peak_tflops, timed


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
