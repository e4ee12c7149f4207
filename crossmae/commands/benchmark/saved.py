"""``crossmae benchmark saved``: what the compiled pretraining step keeps from forward for
backward, at any size, on CPU, without running it."""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config

from crossmae.checkpoint import strict_json
from crossmae.models import CrossMAE, model_class

from .common import build, compile_settings, model_device, synthetic_images


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
