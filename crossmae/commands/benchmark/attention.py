"""``crossmae benchmark attention``: forward + backward of each SDPA backend at the attention
shapes of a ViT-B pretraining step."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from crossmae.checkpoint import strict_json
from crossmae.models.layers import SDPA_BACKENDS, sdpa_backend

from .common import sync


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
