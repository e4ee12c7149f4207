"""The fast paths (one LayerNorm over the decoder blocks' key/value inputs, one K/V product
when the blocks read the same map, activation checkpointing) give the plain path's loss and
gradients."""

from __future__ import annotations

import pytest
import torch
from test_models import TINY

from crossmae.models import CrossMAE


def loss_and_grads(model, imgs, ids, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(imgs, ids_shuffle=ids)
    out["loss"].backward()
    return out["loss"].detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


VARIANTS = [
    dict(),
    dict(weight_fm=False),
    dict(fm_weighting="linear_proj"),
    dict(self_attn=True, pred_ratio=0.25),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=repr)
@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fused_decoder_matches_plain_path(overrides, dtype, tol):
    torch.manual_seed(0)
    model = CrossMAE(**{**TINY, **overrides})
    imgs = torch.randn(4, 3, 32, 32)
    ids = torch.stack([torch.randperm(16) for _ in range(4)])
    model.decoder.fused = False
    loss_ref, grads_ref = loss_and_grads(model, imgs, ids, dtype)
    model.decoder.fused = True
    loss, grads = loss_and_grads(model, imgs, ids, dtype)
    assert rel(loss, loss_ref) <= tol
    worst = max(grads, key=lambda n: rel(grads[n], grads_ref[n]))
    assert rel(grads[worst], grads_ref[worst]) <= tol, worst


def test_activation_checkpointing_matches():
    torch.manual_seed(0)
    model = CrossMAE(**TINY, drop_path_rate=0.0)
    imgs = torch.randn(2, 3, 32, 32)
    ids = torch.stack([torch.randperm(16) for _ in range(2)])
    loss_ref, grads_ref = loss_and_grads(model, imgs, ids)
    model.encoder.grad_checkpointing = True
    loss, grads = loss_and_grads(model, imgs, ids)
    assert torch.equal(loss, loss_ref)
    assert all(torch.allclose(grads[n], grads_ref[n], atol=1e-6) for n in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["crossmae_vit_base_patch16", "mae_vit_base_patch16"])
def test_the_step_compiles_without_graph_breaks(name):
    import crossmae

    model = crossmae.create_model(name, **TINY)
    imgs = torch.randn(2, 3, 32, 32)
    explained = torch._dynamo.explain(model)(imgs, ids_shuffle=model.mask_sampler(2))
    assert explained.graph_break_count == 0, explained.break_reasons
    explained = torch._dynamo.explain(model)(imgs)  # mask drawn inside
    assert explained.graph_break_count == 0, explained.break_reasons
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # as pretraining feeds it
    explained = torch._dynamo.explain(model)(pixels, ids_shuffle=model.mask_sampler(2))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_attention_backend_is_traced_into_the_compiled_graph():
    """A backend set on the layers is part of the graph torch.compile captures (so a compilation
    cached for another backend is never reused), with the same numbers as torch's own choice."""
    from crossmae.models.layers import set_attention_backend

    model = CrossMAE(**TINY)
    imgs, ids = torch.randn(2, 3, 32, 32), model.mask_sampler(2)
    codes, losses = {}, {}
    for name in ("auto", "math"):
        set_attention_backend(model, name)
        graphs = []

        def record(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        losses[name] = torch.compile(model, backend=record, fullgraph=True)(imgs, ids_shuffle=ids)
        codes[name] = graphs[0].code
    torch._dynamo.reset()
    assert "_sdpa_kernel" not in codes["auto"] and "_sdpa_kernel" in codes["math"]
    assert torch.allclose(losses["auto"]["loss"], losses["math"]["loss"], atol=1e-6)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_attention_backend(model, "fastest")


@pytest.mark.gpu
def test_fused_path_on_cuda_bf16_compiled():
    torch.manual_seed(0)
    model = CrossMAE(**{**TINY, "pred_ratio": 0.25}).cuda()
    imgs = torch.randn(8, 3, 32, 32, device="cuda")
    ids = model.mask_sampler(8, "cuda")
    model.decoder.fused = False
    loss_ref, grads_ref = loss_and_grads_on(model, imgs, ids)
    model.decoder.fused = True
    loss, grads = loss_and_grads_on(torch.compile(model), imgs, ids)
    assert rel(loss, loss_ref) <= 3e-2
    assert all(rel(grads[n], grads_ref[n]) <= 5e-2 for n in grads)


def loss_and_grads_on(model, imgs, ids):
    """bf16 autocast on CUDA."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(imgs, ids_shuffle=ids)
    out["loss"].backward()
    names = {n.removeprefix("_orig_mod."): p for n, p in params.items() if p.requires_grad}
    return out["loss"].detach(), {n: p.grad.clone() for n, p in names.items()}


@pytest.mark.gpu
def test_graphed_step_gives_fresh_eager_gradients_on_every_replay():
    """GraphedStep (compiled, fp32): each replay with new inputs gives the eager loss and
    gradients of those inputs, written over the previous ones, never accumulated."""
    from crossmae.cuda_graph import GraphedStep

    torch.manual_seed(0)
    model = CrossMAE(**{**TINY, "pred_ratio": 0.25}).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model)

    def loss_fn(imgs, ids_shuffle):
        return compiled(imgs, ids_shuffle=ids_shuffle)["loss"]

    imgs = torch.randn(8, 3, 32, 32, device="cuda")
    step = GraphedStep(loss_fn, params, imgs=imgs, ids_shuffle=model.mask_sampler(8, "cuda"))
    for _ in range(3):
        x, ids = torch.randn_like(imgs), model.mask_sampler(8, "cuda")
        loss = step(imgs=x, ids_shuffle=ids).clone()
        loss_ref = model(x, ids_shuffle=ids)["loss"]
        grads_ref = torch.autograd.grad(loss_ref, params)
        assert rel(loss, loss_ref.detach()) <= 1e-5
        assert all(rel(p.grad, g) <= 1e-4 for p, g in zip(params, grads_ref, strict=True))
    # the example is the graph's buffer; host inputs (pinned) are copied straight into the buffers
    assert step.static["imgs"].data_ptr() == imgs.data_ptr()
    x, ids = torch.randn(8, 3, 32, 32).pin_memory(), model.mask_sampler(8, "cpu").pin_memory()
    loss = step(imgs=x, ids_shuffle=ids).clone()
    assert rel(loss, model(x.cuda(), ids_shuffle=ids.cuda())["loss"].detach()) <= 1e-5
    # a buffer passed as its own input is replayed as it stands
    loss = step(imgs=step.static["imgs"], ids_shuffle=step.static["ids_shuffle"]).clone()
    assert rel(loss, model(x.cuda(), ids_shuffle=ids.cuda())["loss"].detach()) <= 1e-5
    with pytest.raises(ValueError, match="captured with"):
        step(imgs=x[:4], ids_shuffle=ids[:4])


def test_graphed_step_refuses_cpu_inputs():
    from crossmae.cuda_graph import GraphedStep

    model = CrossMAE(**TINY)
    with pytest.raises(ValueError, match="needs CUDA input tensors"):
        GraphedStep(lambda imgs: model(imgs)["loss"], model.parameters(),
                    imgs=torch.randn(2, 3, 32, 32))  # fmt: skip
