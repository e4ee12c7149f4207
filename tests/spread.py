"""Comparing our numbers with a file that another machine wrote (a parity fixture).

Bit equality holds only between values computed in one run on one machine. A reference file was
written on some other CPU, whose vector units round the last bits of float32 work differently
(``exp`` / ``log`` approximations, fused multiply-adds, the order of a vectorised sum). So a
comparison against such a file uses a tolerance taken from the reference's own spread across
machines, and a discrete outcome (a label, a kept detection, a pixel of a thresholded mask, an
argmax) is compared exactly except where our own value lies within that spread of the decision
boundary: a near-tie, which another CPU may break the other way. Everything here reports, on
failure, how far off the worst entry is, in the unit its tolerance is written in.
"""

from __future__ import annotations

import torch

# one float32 ulp at magnitude 1 (2**-23). A float32 result whose inputs have magnitude up to M
# is rounded at about F32_EPS * M, whatever its own size (x1 = cx - w / 2 near 0 carries the
# rounding of cx ~ M): "n float32 units" below means n * F32_EPS * max |reference|.
F32_EPS = torch.finfo(torch.float32).eps


def float32_units(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| in float32 units at the reference's magnitude (F32_EPS * max |ref|)."""
    if ours.shape != ref.shape:
        raise AssertionError(
            f"shapes differ: ours {tuple(ours.shape)}, reference {tuple(ref.shape)}"
        )
    if ref.numel() == 0:
        return 0.0
    a, b = ours.double(), ref.double()
    scale = F32_EPS * float(b.abs().max().clamp(min=1e-30))
    return float((a - b).abs().max()) / scale


def assert_float32_close(ours: torch.Tensor, ref: torch.Tensor, units: float, what: str) -> None:
    """``ours`` within ``units`` float32 units of ``ref`` (see ``float32_units``)."""
    off = float32_units(ours, ref)
    assert off <= units, f"{what}: {off:.2f} float32 units off (tolerance {units})"


def assert_abs_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    if ours.shape != ref.shape:
        raise AssertionError(f"{what}: shapes differ: {tuple(ours.shape)} vs {tuple(ref.shape)}")
    off = float((ours.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    assert off <= tol, f"{what}: {off:.3g} off (tolerance {tol:.3g})"


def assert_rel_close(ours: float, ref: float, rel: float, what: str) -> None:
    off = abs(float(ours) - ref) / max(abs(ref), 1e-300)
    assert off <= rel, f"{what}: {float(ours)!r} vs {ref!r}, {off:.3g} relative (tolerance {rel:g})"


def assert_equal_except_near_ties(
    ours: torch.Tensor, ref: torch.Tensor, near_tie: torch.Tensor, what: str
) -> int:
    """Discrete outcomes equal wherever ``near_tie`` is False; returns how many near-ties came
    out differently (allowed: another CPU may break them the other way)."""
    if ours.shape != ref.shape:
        raise AssertionError(f"{what}: shapes differ: {tuple(ours.shape)} vs {tuple(ref.shape)}")
    differ = ours != ref
    wrong = differ & ~near_tie
    assert not wrong.any(), (
        f"{what}: {int(wrong.sum())} of {ref.numel()} differ away from any near-tie "
        f"(first at {tuple(int(i) for i in wrong.nonzero()[0])})"
    )
    return int(differ.sum())


def iou_spread(a: torch.Tensor, b: torch.Tensor, delta: float) -> torch.Tensor:
    """(N, 4), (M, 4) XYXY -> (N, M): how far IoU(a_i, b_j) can move when every coordinate of both
    boxes moves by at most ``delta``. The intersection and each area change by at most delta
    times twice their width plus height, so IoU = I / U moves by at most (2 dI + dA + dB) / U."""
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    wb, hb = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(dim=2)  # (N, M)
    union = (wa * ha)[:, None] + (wb * hb)[None] - inter
    d_inter = 2 * delta * (wh[..., 0] + wh[..., 1] + 2 * delta)
    d_a, d_b = 2 * delta * (wa + ha + 2 * delta), 2 * delta * (wb + hb + 2 * delta)
    return (2 * d_inter + d_a[:, None] + d_b[None]) / union.clamp(min=1e-12)
