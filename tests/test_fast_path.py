"""The fast paths (batched K/V projection and LayerNorm over decoder blocks, activation
checkpointing) give the plain path's loss and gradients."""

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
