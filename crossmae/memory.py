"""The GPU memory a training run needs, planned on fake tensors before any GPU is rented.

``plan_memory(task, cfg, gpus)`` builds the task's real model, optimizer and engine, and runs
one full training step (forward, backward, gradient accumulation, clipping, the optimizer; the
optimizer's state made first, as the first step makes it, so that the step planned is every
later one) and one evaluation forward at the config's sizes and precision, on fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes, no data, nothing allocated
on any device). ``LiveBytes``, a dispatch mode under the fake one, sees every tensor an operation
creates and counts the bytes alive after each operation, as the CUDA caching allocator would
(each allocation rounded up to 512 bytes): ``torch.cuda.max_memory_allocated``, not the cache it
reserves, the CUDA context or cuBLAS's workspace. The peak is split into parameters, gradients,
optimizer state and the rest (activations and temporaries); the step's FLOPs are counted on the
way (``torch.utils.flop_counter``, fused attention as PyTorch counts it).

The fake tensors live on the CPU (a fake CUDA tensor cannot run backward without a GPU), so
three things a GPU does differently are applied as a GPU would: the fused AdamW; CUDA's autocast
rule that softmax, log-softmax, layer and group norm run in float32; and fused attention
(``F.scaled_dot_product_attention`` keeps its inputs, output and log-sum-exp, never the (N, N)
weights, as flash and memory-efficient attention do on an H100). fp16 is planned as bf16 (the
same bytes; the loss scaler's few scalars aside).

Operations whose output size depends on the data (``nonzero``, boolean indexing, ``unique``,
non-maximum suppression) take their worst case: every element selected, every value distinct,
every box kept, as the config's own caps (top-k, RoIs sampled per image) then cut them. A value
read back from a tensor reads as from valid data: a number 0, ``all()`` true, ``any()`` false
(``if not valid.all():`` and an initialiser's ``while mask.any():`` take the path of valid
data). docs/results.md has the estimates against measured and published numbers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger("crossmae")
GIB = 2**30
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this


def allocated_bytes(nbytes: int) -> int:
    """What the caching allocator counts for an allocation of ``nbytes``."""
    return max(BLOCK, math.ceil(nbytes / BLOCK) * BLOCK) if nbytes else 0


class PlanError(RuntimeError):
    """A step the planner cannot run on fake tensors; the message names the operation."""


# data-dependent operations and their worst case
def _worst_nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)


def _bool_indices(indices: list) -> list:
    """Boolean masks in an ``index`` call -> long indices selecting every element."""
    out = []
    for ix in indices:
        if ix is not None and ix.dtype == torch.bool:
            out.extend(torch.arange(n, device=ix.device) if ix.dim() == 1 else
                       _worst_nonzero(ix)[:, d] for d, n in enumerate(ix.shape))  # fmt: skip
        else:
            out.append(ix)
    return out


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages alive after every operation (module docstring).

    Storages that exist before the step (parameters, buffers) are counted with ``track`` or
    ``restart``; the split of the peak comes from ``categorize(self)``, called at each new
    peak."""

    def __init__(self, categorize=None):
        super().__init__()
        self.sizes: dict[int, int] = {}  # live storage -> allocated bytes
        self.current = self.peak = 0
        self.peak_op = ""
        self.peak_parts: dict[str, int] = {}
        self.categorize = categorize
        self._next = 0
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._any: set[int] = set()  # storages holding the result of an any()
        self.bounded: set[str] = set()  # data-dependent operations given their worst case

    def track(self, t: torch.Tensor) -> int | None:
        """Count ``t``'s storage (once); its key."""
        st = t.untyped_storage()
        key = self._keys.get(st)
        if key is None:
            key = self._keys[st] = self._next
            self._next += 1
            self.sizes[key] = n = allocated_bytes(st.nbytes())
            self.current += n
            weakref.finalize(st, self._free, key)
        return key

    def restart(self, tensors, categorize=None) -> None:
        """Forget every storage counted so far; count ``tensors`` from now on (the peak too)."""
        self.sizes.clear()
        self._any.clear()
        self._keys = weakref.WeakKeyDictionary()
        self.current = self.peak = 0
        for t in tensors:
            self.track(t)
        self.categorize = categorize

    def key_of(self, t: torch.Tensor) -> int | None:
        return self._keys.get(t.untyped_storage())

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self._any.discard(key)

    def _account(self, name: str) -> None:
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, name
            if self.categorize is not None:
                self.peak_parts = self.categorize(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if func is torch.ops.aten._local_scalar_dense.default:  # the data reads as valid
            if args[0].dtype != torch.bool:
                return 0
            return self.key_of(args[0]) not in self._any  # any(): nothing found; all(): holds
        if func in (torch.ops.aten.nonzero.default,):
            out = _worst_nonzero(args[0])
            self.bounded.add("nonzero")
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                      torch.ops.aten.index_put_.default) and any(
            ix is not None and ix.dtype == torch.bool for ix in args[1]
        ):  # fmt: skip
            out = func(args[0], _bool_indices(args[1]), *args[2:], **kwargs)
            self.bounded.add("boolean indexing")
        elif func is torch.ops.aten._unique2.default:  # every value distinct
            x = args[0]
            out = (x.flatten().clone(), torch.zeros(x.shape, dtype=torch.long, device=x.device),
                   torch.ones(x.numel(), dtype=torch.long, device=x.device))  # fmt: skip
            self.bounded.add("unique")
        elif name == "nms":  # torchvision: every box kept, in order
            out = torch.arange(args[0].shape[0], device=args[0].device)
            self.bounded.add("nms")
        else:
            try:
                out = func(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - named and re-raised with the operation
                if isinstance(e, PlanError):
                    raise
                first = next(iter(str(e).strip().splitlines()), "")  # one line
                raise PlanError(f"{func}: {type(e).__name__}: {first}") from None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = self.track(t)
                if name == "any":
                    self._any.add(key)
        self._account(name)
        return out


@dataclass
class MemoryPlan:
    """The estimate for one process (one GPU)."""

    config: str
    gpus: int
    batch_per_gpu: int
    micro_batch: int
    accumulation: int
    precision: str
    peak: int
    parts: dict[str, int] = field(default_factory=dict)
    peak_op: str = ""
    eval_peak: int = 0
    notes: list[str] = field(default_factory=list)
    train_flops_per_image: float = 0.0  # one training step's FLOPs / its images
    activation_checkpointing: bool = False

    @property
    def peak_gib(self) -> float:
        return max(self.peak, self.eval_peak) / GIB

    def row(self, gpu_memory: float) -> dict[str, Any]:
        return {"config": self.config, "gpus": self.gpus, "batch_per_gpu": self.batch_per_gpu,
                "micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "precision": self.precision, "peak_gib": round(self.peak_gib, 2),
                "train_gib": round(self.peak / GIB, 2), "eval_gib": round(self.eval_peak / GIB, 2),
                **{f"{k}_gib": round(v / GIB, 2) for k, v in self.parts.items()},
                "activation_checkpointing": self.activation_checkpointing,
                "train_gflop_per_img": round(self.train_flops_per_image / 1e9, 1),
                "fits": self.peak_gib <= gpu_memory, "gpu_memory_gib": gpu_memory,
                "notes": self.notes}  # fmt: skip


def _categorizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The peak's split, called at every new peak: the tensor lists are made once (walking the
    modules at every peak was a third of a detection plan's time)."""
    params = list(model.parameters())
    owned = [*params, *model.buffers()]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]

    def categorize(mode: LiveBytes) -> dict[str, int]:
        def total(tensors) -> int:
            keys = {mode.key_of(t) for t in tensors}
            return sum(mode.sizes.get(k, 0) for k in keys if k is not None)

        weights, moments = total(owned), total(state)
        grads = total([p.grad for p in params if p.grad is not None])
        return {"parameters": weights, "gradients": grads, "optimizer": moments,
                "activations": mode.current - weights - grads - moments}  # fmt: skip

    return categorize


# CUDA's autocast runs these in float32 (their outputs float32, kept for backward in float32);
# the CPU's autocast leaves them in the lower precision: the planner applies CUDA's rule
_FLOAT32_UNDER_CUDA_AUTOCAST = ("softmax", "log_softmax", "layer_norm", "group_norm")


def _in_float32(fn):
    def run(x, *args, **kwargs):
        if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return fn(x, *args, **kwargs)

    return run


class _FusedAttention(torch.autograd.Function):
    """The memory of a GPU's fused attention (flash / memory-efficient, as PyTorch picks them on
    an H100): it keeps the inputs, the bias, the output and the log-sum-exp, never the (N, N)
    weights, and its backward makes one gradient per input. Shapes only: the planner's stand-in."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)  # fmt: skip
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scale
        )
        grads = [g if n else None for g, n in zip(grads, needs, strict=False)]
        return (*grads, torch.empty_like(bias) if bias is not None and needs[3] else None, None)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args,
                              out_shape=None, **kwargs):  # fmt: skip
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def count_flops() -> flop_counter.FlopCounterMode:
    """PyTorch's FLOP counter (a multiply-add is 2 FLOPs), which also counts the planner's
    fused-attention stand-in as fused attention."""
    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
        },
    )


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):  # fmt: skip
    if torch.is_autocast_enabled("cpu"):  # the fused kernels take the autocast dtype
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    return _FusedAttention.apply(query, key, value, attn_mask, scale)


@contextlib.contextmanager
def fake_tensors():
    """Fake tensors for everything created inside (constants of the model's code included).
    Fake parameters cannot be moved by ``Module.to`` (it swaps them, which fake tensors refuse);
    every fake tensor is on the planner's one device already, so a move to a device is skipped."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    move = torch.nn.Module.to

    def to(module, *args, **kwargs):
        if any(isinstance(a, torch.dtype) or torch.is_tensor(a) for a in args) or "dtype" in kwargs:
            return move(module, *args, **kwargs)
        return module

    # torchvision's batched NMS on many boxes loops over the distinct classes (every value is
    # distinct here): its one-call form keeps the same boxes (all of them) in one NMS
    import torch.nn.functional as F
    import torchvision.ops.boxes as tvboxes

    pairs = [(torch.nn.Module, "to", to),
             (tvboxes, "_batched_nms_vanilla", tvboxes._batched_nms_coordinate_trick),
             (F, "scaled_dot_product_attention", _cuda_sdpa),
             (torch.Tensor, "softmax", _in_float32(torch.Tensor.softmax))]  # fmt: skip
    pairs += [(F, n, _in_float32(getattr(F, n))) for n in _FLOAT32_UNDER_CUDA_AUTOCAST]
    with contextlib.ExitStack() as stack:
        for owner, name, value in pairs:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))


def plan_memory(task_cls, cfg, gpus: int, *, name: str = "", steps: int = 1,
                evaluate: bool = True) -> MemoryPlan:  # fmt: skip
    """The per-GPU peak of ``cfg``'s training on ``gpus`` processes (module docstring)."""
    from .engine import Engine, plan_batches, step_options
    from .optim import build_optimizer, peak_lr
    from .precision import autocast_dtype, resolve_precision

    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    micro, accum = plan_batches(tc.batch_size, gpus, tc.micro_batch)
    device = torch.device("cpu")
    task = task_cls(cfg)
    task.device = device
    if "precision" in tc:
        tc.precision = resolve_precision(tc.precision, torch.device("cuda"))
    task.resolve(cfg)
    # from the second micro-batch on, each one allocates and frees what the second did (the
    # gradients already exist): two stand for any longer accumulation
    planned_accum = min(accum, 2)
    options = step_options(task, cfg, planned_accum)
    options.compile = options.cuda_graph = False
    precision = tc.get("precision", "fp32")
    if options.precision == "fp16":  # the loss scaler needs CUDA; its memory is two scalars
        options.precision = "bf16"
    autocast_dtype(options.precision)
    notes = []
    mode = LiveBytes()
    with fake_tensors(), mode:
        torch.manual_seed(tc.seed)
        task.plan_data()
        task.model = model = task.build_model(device)
        # as on a GPU: the fused AdamW (no per-step temporaries, steps counted in tensors)
        optimizer = build_optimizer(task.param_groups(model), peak_lr(cfg.optim, tc.batch_size,
                                    task.lr_factor()), cfg.optim, torch.device("cuda"))  # fmt: skip
        engine = Engine(model, optimizer, None, lambda step: 1e-4, task, steps=steps,
                        device=device, options=options)  # fmt: skip
        engine.prepare()
        # the optimizer's state made as the first step makes it: the steps planned below are
        # every later step (their peak sees the whole state)
        trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        for p in trained:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        # what building left on the host is not on the GPU: from here, the model's own bytes
        mode.restart([*model.parameters(), *model.buffers(), *state],
                     _categorizer(model, optimizer))  # fmt: skip
        batches = (task.example_batch(micro) for _ in range(steps * planned_accum))
        with count_flops() as flops:  # the first step: forward, backward, the optimizer
            engine.train_step(batches)
        for _ in range(steps - 1):
            engine.train_step(batches)
        train_peak, parts, op = mode.peak, mode.peak_parts, mode.peak_op
        eval_peak = 0
        if evaluate and task.evaluation() is not None:
            mode.peak = 0
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype(
                    options.precision), enabled=options.precision != "fp32"):  # fmt: skip
                task.plan_evaluation(model, task.example_batch(micro, training=False), device)
            eval_peak = mode.peak
    if mode.bounded:
        notes.append(f"worst case taken for {', '.join(sorted(mode.bounded))} (sizes that "
                     "depend on the data)")  # fmt: skip
    if gpus > 1 and train_peak:  # DDP keeps a bucket copy of every trained gradient
        buckets = sum(allocated_bytes(p.numel() * p.element_size())
                      for p in model.parameters() if p.requires_grad)  # fmt: skip
        parts = {**parts, "ddp_buckets": buckets}
        train_peak += buckets
        eval_peak += buckets if eval_peak else 0
    return MemoryPlan(config=name, gpus=gpus, batch_per_gpu=micro * accum, micro_batch=micro,
                      accumulation=accum, precision=precision, peak=train_peak, parts=parts,
                      peak_op=op, eval_peak=eval_peak, notes=notes,
                      train_flops_per_image=flops.get_total_flops() / (micro * planned_accum),
                      activation_checkpointing=options.activation_checkpointing)  # fmt: skip


def budget_of(setting, device: torch.device) -> float:
    """The GiB ``train.gpu_memory`` plans for: its number, or with ``auto`` this process's GPU's
    own memory (the one moment the planner asks a GPU anything)."""
    from .config import ConfigError

    if setting != "auto":
        return float(setting)
    if device.type != "cuda":
        raise ConfigError(
            "train.gpu_memory=auto plans for this process's GPU, and this one runs "
            "on the CPU: give the card's memory in GiB (train.gpu_memory=24)"
        )
    return torch.cuda.get_device_properties(device).total_memory / GIB


def fit_to_gpu_memory(task_cls, cfg, gpus: int, device: torch.device) -> tuple[float, str]:
    """What ``train.gpu_memory`` does to ``cfg`` before a run: the budget in GiB
    (``budget_of``), then ``train.micro_batch`` and ``train.activation_checkpointing`` set to
    what fits (``fit_micro_batch``). Returns the budget and the line that says why."""
    tc = cfg.train
    budget = budget_of(tc.gpu_memory, device)
    tc.micro_batch, tc.activation_checkpointing, why = fit_micro_batch(task_cls, cfg, gpus, budget)
    return budget, why


def fit_micro_batch(task_cls, cfg, gpus: int, budget_gib: float) -> tuple[int, bool, str]:
    """The largest micro-batch (a divisor of the per-GPU batch) whose planned peak fits in
    ``budget_gib``; activation checkpointing only when even the smallest does not fit without
    it. Returns the micro-batch, whether to checkpoint, and the line that says why; a
    ``ConfigError`` naming the smallest plan when nothing fits.

    The first micro-batch planned after the full one is the largest that the full plan's
    activations, scaled to fewer images, predict to fit; from there the plans step down until
    one fits and up while the next larger one fits (two or three plans, not one per divisor)."""
    from omegaconf import OmegaConf

    from .config import ConfigError

    per_gpu = cfg.train.batch_size // gpus
    micros = [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0]  # largest first
    plans: dict[tuple[int, bool], MemoryPlan] = {}

    def plan(micro: int, ckpt: bool) -> MemoryPlan:
        if (micro, ckpt) not in plans:
            trial = copy.deepcopy(cfg)
            OmegaConf.update(trial, "train.micro_batch", micro)
            OmegaConf.update(trial, "train.activation_checkpointing", ckpt)
            plans[micro, ckpt] = plan_memory(task_cls, trial, gpus)
        return plans[micro, ckpt]

    def fits(i: int, ckpt: bool) -> bool:
        return plan(micros[i], ckpt).peak_gib <= budget_gib

    given = bool(cfg.train.activation_checkpointing)
    for ckpt in dict.fromkeys([given, True]):
        full = plan(per_gpu, ckpt)
        activations = full.parts.get("activations", 0)
        per_image = activations / per_gpu
        room = budget_gib * GIB - (full.peak - activations)
        i = next((i for i, m in enumerate(micros) if m * per_image <= room), len(micros) - 1)
        while i < len(micros) and not fits(i, ckpt):
            i += 1
        if i == len(micros):
            continue
        while i > 0 and fits(i - 1, ckpt):
            i -= 1
        micro, chosen = micros[i], plan(micros[i], ckpt)
        why = (f"batch {per_gpu} per GPU needs an estimated {plan(per_gpu, given).peak_gib:.3g} "
               f"GiB of {budget_gib:g}")  # fmt: skip
        if ckpt and not given:
            why += (f" (micro-batch {micros[-1]}: {plan(micros[-1], False).peak_gib:.3g}); "
                    "with activation checkpointing")  # fmt: skip
        if micro == per_gpu:
            return micro, ckpt, why + ": no accumulation"
        return micro, ckpt, (f"{why}: micro-batch {micro} ({chosen.peak_gib:.3g} GiB) x "
                             f"{per_gpu // micro} accumulation")  # fmt: skip
    smallest = plan(micros[-1], True)
    raise ConfigError(
        f"train.gpu_memory={budget_gib:g}: even a micro-batch of 1 with activation checkpointing "
        f"needs an estimated {smallest.peak_gib:.3g} GiB per GPU (peak at {smallest.peak_op}); "
        "use a GPU with more memory, more GPUs do not help a micro-batch of 1"
    )
