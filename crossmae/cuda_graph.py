"""Forward + backward of a training step replayed from one CUDA graph.

A ViT-B step launches over a thousand kernels (several hundred even after ``torch.compile``
fuses the elementwise work); at batch 256 on an H100 the card waited 3 to 11 ms of each compiled
step for the host to launch them, depending on the machine (``docs/results.md``, issue 4).
Captured once, the whole forward and backward is one launch, and the step runs at the speed of
its kernels.

The optimizer step stays outside the graph, so the loop can still skip a non-finite step, clip,
log the gradient norm and change the learning rate as plain Python. Replays write the gradients
into the same ``.grad`` tensors every time (written, not accumulated), so the caller must never
set them to None or zero them: ``optimizer.zero_grad`` is not needed and would break the graph.
Build it before anything keeps an autograd graph through the parameters alive (a loss kept from
an earlier backward): that graph pins their gradient accumulation to the default stream, which
capture refuses (``cudaErrorStreamCaptureImplicit``).

Usage (see ``crossmae.train.pretrain`` with ``train.cuda_graph=true``)::

    def loss_fn(imgs, ids_shuffle):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(imgs, ids_shuffle=ids_shuffle, with_pred=False)["loss"]

    step = GraphedStep(loss_fn, model.parameters(), imgs=imgs, ids_shuffle=ids)
    loss = step(imgs=imgs, ids_shuffle=ids)  # gradients are in p.grad
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class GraphedStep:
    """``loss_fn(**inputs)`` and its backward, captured as a CUDA graph on the first inputs.

    Args:
        loss_fn: maps the named input tensors to a scalar loss (autocast inside it needs
            ``cache_enabled=False``, as for any CUDA-graph capture). May be ``torch.compile``d.
        params: the parameters whose gradients the backward computes.
        warmup: eager calls before capture, on a side stream (lazy initialisation, compilation,
            cuDNN/cuBLAS heuristics must not happen during capture). Their gradients are dropped.
        **example: the input tensors (CUDA). They become the graph's input buffers
            (``static``), not copies: later calls write their inputs into them, so a caller does
            not keep using them for anything else. Later calls give the same shapes and dtypes.
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        params: Iterable[nn.Parameter],
        warmup: int = 3,
        **example: torch.Tensor,
    ):
        self.params = [p for p in params if p.requires_grad]
        if not example or any(not t.is_cuda for t in example.values()):
            raise ValueError("GraphedStep needs CUDA input tensors (CUDA graphs are CUDA-only)")
        self.static = {k: v.detach() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                loss_fn(**self.static).backward()
                self._clear_grads()
        torch.cuda.current_stream().wait_stream(side)
        self._clear_grads()  # gradients allocated inside the graph: replays write them in place
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = loss_fn(**self.static)
            loss.backward()
        self.loss = loss.detach()

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Copy ``inputs`` into the graph's buffers, replay; returns the loss (overwritten by the
        next call: clone it to keep it). An input may be in (pinned) host memory, copied straight
        into its buffer; one that is its buffer (``static[name]``, or the example it was
        captured with) is not copied at all."""
        if inputs.keys() != self.static.keys():
            raise ValueError(f"GraphedStep was captured with inputs {sorted(self.static)}, "
                             f"got {sorted(inputs)}")  # fmt: skip
        for name, t in inputs.items():
            buf = self.static[name]
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise ValueError(
                    f"input {name!r} is {t.dtype} {tuple(t.shape)}; the graph was captured with "
                    f"{buf.dtype} {tuple(buf.shape)} (a CUDA graph replays fixed shapes)"
                )
            if t.device != buf.device or t.data_ptr() != buf.data_ptr():
                buf.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.loss
