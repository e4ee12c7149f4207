"""The paper's analyses, computed beside the models (no analysis path in the training code):

- ``decoder_block_terms``: App. D / Fig. 5a-b, the CrossMAE prediction as a sum of one term per
  decoder block (plus the queries' term), through the linear reconstruction head;
- ``iba_weights``: Fig. 5c, the inter-block attention weights (decoder block x encoder map);
- ``mae_attention_mass``: Fig. 1b / Table 6, how much attention MAE's mask tokens give to
  visible tokens and to other mask tokens, per decoder block;
- ``flop_counts``: Fig. 7's decoder FLOPs, with fvcore (plus handles for the operators it does
  not count) cross-checked against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .models import MAE, CrossMAE
from .models.masking import split_shuffle


@torch.no_grad()
def decoder_block_terms(
    model: CrossMAE, imgs: torch.Tensor, ids_shuffle: torch.Tensor, pred_ratio: float | None = None
) -> dict[str, torch.Tensor]:
    """CrossMAE's prediction split into ``1 + decoder_depth`` additive terms (App. D).

    With ``f_0`` the queries and ``g_i`` block i's residual update, the decoder output is
    ``f_0 + g_1 + ... + g_D`` and the prediction is ``head(f_D)``, head = LayerNorm + Linear.
    With the LayerNorm's scale taken from ``f_D`` (as in the forward pass), the head is affine, so
    ``pred = h(f_0) + h(g_1) + ... + h(g_D)`` where each term is centred by its own mean, divided
    by ``f_D``'s std and projected; the head's biases belong to the first term.

    Returns ``terms`` (1 + D, N, n_pred, p*p*C), their sum ``pred`` (N, n_pred, p*p*C; the model's
    prediction), ``ids_pred`` (N, n_pred) and ``mask`` (N, L, 1 = predicted).
    """
    dec = model.decoder
    g = model.pred_ratio if pred_ratio is None else pred_ratio
    counts, ids_shuffle = model.make_mask(imgs, model.mask_ratio, g, ids_shuffle)
    ids_keep, ids_pred, mask = split_shuffle(ids_shuffle, counts)
    maps = model.encode(imgs, ids_keep)
    x = dec.queries(ids_pred)
    parts = [x]
    for blk, kv in zip(dec.blocks, dec.key_values(maps), strict=True):
        y = blk(x, kv)
        parts.append(y - x)
        x = y
    norm, head = dec.norm, dec.pred
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    terms = []
    for i, part in enumerate(parts):
        z = (part - part.mean(-1, keepdim=True)) / std * norm.weight
        terms.append(
            F.linear(z, head.weight, head.bias + head.weight @ norm.bias if i == 0 else None)
        )
    terms = torch.stack(terms)
    return {"terms": terms, "pred": terms.sum(0), "ids_pred": ids_pred, "mask": mask}


def iba_weights(model: nn.Module) -> torch.Tensor:
    """The effective inter-block attention weights, (decoder blocks, encoder maps); the maps are
    the input tokens (if used) then the encoder blocks in ``model.fm_blocks`` order."""
    iba = getattr(model.decoder, "iba", None)
    if iba is None:
        raise ValueError("this model has no inter-block attention (weight_fm=False)")
    return iba.mixing_weights().detach().float().cpu()


@torch.no_grad()
def mae_attention_mass(
    model: MAE, imgs: torch.Tensor, ids_shuffle: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Attention that MAE's mask tokens pay to each kind of token, per decoder block.

    The inputs of each decoder block are captured with forward pre-hooks during an ordinary
    forward pass; the attention probabilities are recomputed from them here (the model itself
    uses fused attention and never forms them). Returns per-block means over images, heads and
    mask-token queries (each (depth,)): ``visible`` (visible patch tokens), ``cls`` (the cls
    token), ``mask`` (mask tokens, the query's own included), which add up to 1; and
    ``per_query_sum`` (depth, N, heads, n_mask), each 1 up to rounding.
    """
    if not isinstance(model, MAE):
        raise TypeError("mae_attention_mass needs an MAE model (CrossMAE's mask tokens never "
                        "attend to each other)")  # fmt: skip
    inputs: list[torch.Tensor] = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.decoder.blocks
    ]
    was_training = model.training
    try:
        model.eval()
        out = model(imgs, ids_shuffle=ids_shuffle)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    masked = out["mask"].bool()  # (N, L), 1 = masked
    key_is_mask = torch.cat([torch.zeros_like(masked[:, :1]), masked], dim=1)  # (N, 1 + L)
    key_is_cls = torch.zeros_like(key_is_mask)
    key_is_cls[:, 0] = True
    result = {"visible": [], "cls": [], "mask": [], "per_query_sum": []}
    for blk, x in zip(model.decoder.blocks, inputs, strict=True):
        attn = blk.attn
        B, T, C = x.shape
        qkv = attn.qkv(blk.norm1(x)).view(B, T, 3, attn.num_heads, C // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, d)
        probs = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, h, T, T)
        queries = probs[:, :, 1:][masked.unsqueeze(1).expand(-1, probs.shape[1], -1)]
        queries = queries.view(B, probs.shape[1], -1, T)  # (B, heads, n_mask, T)
        to_mask = (queries * key_is_mask[:, None, None]).sum(-1)
        to_cls = (queries * key_is_cls[:, None, None]).sum(-1)
        total = queries.sum(-1)
        result["mask"].append(to_mask.mean())
        result["cls"].append(to_cls.mean())
        result["visible"].append((total - to_mask - to_cls).mean())
        result["per_query_sum"].append(total)
    return {k: torch.stack(v).float().cpu() for k, v in result.items()}


# ----------------------------------------------------------------------------------- FLOPs
def _shapes(inputs) -> list[list[int]]:
    from fvcore.nn.jit_handles import get_shape

    return [get_shape(i) for i in inputs]


def _sdpa_macs(inputs, outputs) -> int:
    """q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv): QK^T and attention x V."""
    q, k, v = _shapes(inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


MATMUL_OPS = ("linear", "matmul", "bmm", "addmm", "einsum", "conv", "scaled_dot_product_attention")


class _Pred(nn.Module):
    """model(imgs) -> pred with a fixed mask, for tracing."""

    def __init__(self, model: nn.Module, ids_shuffle: torch.Tensor, pred_ratio: float | None):
        super().__init__()
        self.model, self.ids, self.kw = model, ids_shuffle, {}
        if pred_ratio is not None:
            self.kw["pred_ratio"] = pred_ratio

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.model(imgs, ids_shuffle=self.ids, **self.kw)["pred"]


@torch.no_grad()
def flop_counts(model: nn.Module, pred_ratio: float | None = None, seed: int = 0) -> dict:
    """Forward FLOPs of one image, in GMACs (fvcore's convention, 1 multiply-add = 1).

    fvcore counts with an extra handle for ``scaled_dot_product_attention`` (which it skips by
    default). ``torch.utils.flop_counter`` counts the same forward with the math attention kernel
    (its fused CPU attention kernel is not counted); both count matrix products and attention
    only, fvcore also counts LayerNorms. Returns fvcore's ``total``, ``encoder``, ``decoder`` and
    ``matmul`` (its matrix-product and attention part) and torch's ``torch_total`` and
    ``torch_decoder``.
    """
    import warnings

    from fvcore.nn import FlopCountAnalysis
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = model.mask_sampler(1, None, g)
    size = [s * model.patch_size for s in model.grid_size]
    imgs = torch.randn(1, 3, *size, generator=g)
    wrapped = _Pred(model, ids, pred_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa = FlopCountAnalysis(wrapped, imgs)
        fa.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        by_module, by_op = fa.by_module(), fa.by_operator()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        wrapped(imgs)
    model.train(was_training)
    torch_by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    decoder_key = next(k for k in torch_by_module if k.endswith(".model.decoder"))
    return {
        "total": by_module[""] / 1e9,
        # everything outside the decoder: the encoder's blocks and its patch embedding, which
        # runs as a method of the encoder (visible_patch_tokens) and so is traced at the top
        "encoder": (by_module[""] - by_module["model.decoder"]) / 1e9,
        "decoder": by_module["model.decoder"] / 1e9,
        "matmul": sum(v for k, v in by_op.items() if k in MATMUL_OPS) / 1e9,
        "torch_total": counter.get_total_flops() / 2e9,
        "torch_decoder": torch_by_module[decoder_key] / 2e9,
    }
