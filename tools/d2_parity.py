"""How closely det/ reproduces detectron2's ViTDet Mask R-CNN on a parity file, and what each
behaviour det/ once had instead of detectron2's would change there.

    python tools/d2_parity.py [--fixture ../shared/fixtures/vitdet_d2_tiny.pt] [--out report.md]

The file (``detectron2-vitdet-mask-rcnn-parity-v1``) holds detectron2's own outputs at every
stage and its state dict; see ``det/parity.py``. Each row runs our detector (float64, from the
file's config, detectron2's weights) with one behaviour swapped for the old one, and compares
with detectron2: features (max relative error), proposals (share moved by more than 1e-4 px),
detections (detectron2's detections with one of ours of the same class at IoU >= 0.9), pasted
masks (mean / min IoU with detectron2's) and training losses (max relative error).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import det.roi_heads
import det.rpn
from det.backbone import LayerNorm2d
from det.model import ViTDetMaskRCNN, postprocess
from det.parity import evaluation_stages, load_fixture, model_from_config, replay_training
from det.structures import pairwise_iou, paste_masks_in_image, polygons_to_bitmask

DEFAULT_FIXTURE = Path(__file__).resolve().parents[1].parent / "shared/fixtures/vitdet_d2_tiny.pt"


@contextlib.contextmanager
def swapped(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def black_padding(model: ViTDetMaskRCNN):
    """1: images padded with black pixels, then normalised (padding = -mean / std)."""
    orig = model.preprocess

    def preprocess(images):
        batch = orig(images)
        fill = -model.pixel_mean / model.pixel_std
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            pad = torch.ones_like(batch[i, 0], dtype=torch.bool)
            pad[:h, :w] = False
            batch[i][:, pad] = fill.view(3, 1).expand(3, int(pad.sum()))
        return batch

    return swapped(model, "preprocess", preprocess)


def canvas_clipping(model: ViTDetMaskRCNN):
    """2: proposals and detections clipped to the padded canvas, not the image."""
    S, clip = model.img_size, det.rpn.clip_boxes
    stack = contextlib.ExitStack()
    for module in (det.rpn, det.roi_heads):
        stack.enter_context(swapped(module, "clip_boxes", lambda b, size: clip(b, (S, S))))
    return stack


def layernorm_eps(model: ViTDetMaskRCNN):
    """3: LayerNorm eps 1e-5 in the pyramid and heads."""
    stack = contextlib.ExitStack()
    for m in model.modules():
        if isinstance(m, LayerNorm2d):
            stack.enter_context(swapped(m, "eps", 1e-5))
    return stack


def integer_anchors(model: ViTDetMaskRCNN):
    """4: anchor corners rounded to integers (torchvision)."""
    gen = model.proposal_generator.anchor_generator
    return swapped(gen, "cells", [c.round() for c in gen.cells])


def smooth_l1(model: ViTDetMaskRCNN):
    """5: smooth-L1 box losses with beta 1/9 (torchvision) instead of L1."""
    stack = contextlib.ExitStack()
    for m in (model.proposal_generator, model.roi_heads):
        stack.enter_context(swapped(m, "smooth_l1_beta", 1 / 9))
    return stack


def soft_mask_targets(model: ViTDetMaskRCNN):
    """6: mask targets by RoIAlign (aligned=False) of the full-image mask, soft (torchvision)."""
    S = model.img_size

    def target(polygons, box, size):
        full = torch.from_numpy(polygons_to_bitmask(polygons, S, S)).double()[None, None]
        roi = torch.tensor([[0.0, *box.tolist()]], dtype=torch.float64)
        return roi_align(full, roi, (size, size), 1.0, sampling_ratio=0, aligned=False)[0, 0]

    return swapped(det.roi_heads, "rasterize_polygons_within_box", target)


def canvas_paste(result: dict, size: tuple[int, int], orig: tuple[int, int], S: int) -> dict:
    """7: masks pasted (soft) into the padded canvas at input scale, the valid part resized
    bilinearly to the original image, thresholded at 0.5."""
    out = postprocess({k: v for k, v in result.items() if k != "mask_probs"}, size, orig)
    if len(out["boxes"]) != len(result["boxes"]):
        raise ValueError("postprocess dropped a box: the canvas paste would misalign")
    canvas = paste_masks_in_image(result["mask_probs"], result["boxes"], (S, S), threshold=None)
    m = canvas[:, None, : size[0], : size[1]]
    out["masks"] = F.interpolate(m, size=orig, mode="bilinear", align_corners=False)[:, 0] >= 0.5
    return out


def matched_mask_ious(pp: dict, ref: dict, ref_masks: torch.Tensor) -> torch.Tensor:
    """Mask IoU of each of detectron2's detections with our best-overlapping one of its class
    (box IoU >= 0.9); detections without such a match are left out."""
    iou = pairwise_iou(ref["pred_boxes"], pp["boxes"].float())
    iou[ref["pred_classes"][:, None] != pp["classes"][None, :]] = 0
    if iou.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    best, idx = iou.max(dim=1)
    hit = best >= 0.9
    a, b = ref_masks[hit], pp["masks"][idx[hit]]
    inter = (a & b).flatten(1).sum(1).double()
    return inter / (a | b).flatten(1).sum(1).double().clamp(min=1)


def compare(model: ViTDetMaskRCNN, fx: dict, *, paste=None, autocast=False) -> dict:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        run = evaluation_stages(model, fx)
    feat = proposals_moved = n_props = found = n_dets = 0.0
    ious = []
    for i, case in enumerate(fx["cases"]):
        rel = [(run["pyramid"][k][i].double() - v).abs().max() / v.abs().max()
               for k, v in case["pyramid"].items()]  # fmt: skip
        feat = max(feat, float(max(rel)))
        boxes, ref = run["proposals"][i][0], case["proposals"]["boxes"]
        n = min(len(boxes), len(ref))
        moved = ((boxes[:n] - ref[:n]).abs().amax(1) > 1e-4).sum()
        proposals_moved += float(moved) + abs(len(boxes) - len(ref))
        n_props += len(ref)
        ours = {k: v.double() if v.dtype == torch.bfloat16 else v
                for k, v in run["detections"][i].items()}  # fmt: skip
        theirs = case["instances"]
        iou = pairwise_iou(theirs["pred_boxes"], ours["boxes"].float())
        same = theirs["pred_classes"][:, None] == ours["classes"][None, :]
        found += float(((iou >= 0.9) & same).any(dim=1).sum())
        n_dets += len(theirs["pred_boxes"])
        size, orig = run["sizes"][i], tuple(case["orig_size"])
        pp = paste(ours, size, orig) if paste else postprocess(ours, size, orig)
        ref_pp = case["instances_postprocessed"]
        n_m, h, w = ref_pp["pred_masks_shape"]
        bits = np.unpackbits(ref_pp["pred_masks_packed"].numpy(), count=n_m * h * w)
        ref_masks = torch.from_numpy(bits.reshape(n_m, h, w).astype(bool))
        ious.append(matched_mask_ious(pp, ref_pp, ref_masks))
    ious = torch.cat(ious)
    return {
        "features": feat,
        "proposals": proposals_moved / n_props,
        "detections": f"{int(found)} / {int(n_dets)}",
        "masks": f"{float(ious.mean()):.3f} / {float(ious.min()):.3f}",
    }


def loss_error(model: ViTDetMaskRCNN, fx: dict) -> str:
    losses = replay_training(model, fx)["losses"]
    ref = fx["train"]["losses"]
    errs = {k: abs(float(v) - ref[k]) / abs(ref[k]) for k, v in losses.items()}
    worst = max(errs, key=errs.get)
    return f"{errs[worst]:.1e} ({worst})"


ROWS = [
    ("detectron2's behaviour throughout (det/ now)", None),
    ("1. black padding, then normalised", black_padding),
    ("2. boxes clipped to the padded canvas", canvas_clipping),
    ("3. LayerNorm eps 1e-5 (pyramid, heads)", layernorm_eps),
    ("4. integer anchors", integer_anchors),
    ("5. smooth-L1 box losses, beta 1/9", smooth_l1),
    ("6. soft RoIAlign mask targets (aligned=False)", soft_mask_targets),
    ("7. masks pasted into the canvas, then resized", "paste"),
    ("13. bf16 autocast evaluation (float32 model)", "bf16"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fixture", default=str(DEFAULT_FIXTURE))
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    fx = load_fixture(args.fixture)
    lines = ["| variant | features (max rel. error) | proposals moved > 1e-4 px | "
             "detectron2 detections found (IoU >= 0.9, same class) | mask IoU mean / min | "
             "training losses (max rel. error) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, variant in ROWS:
        dtype = torch.float32 if variant == "bf16" else torch.float64
        model = model_from_config(fx["config"], dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in fx["state_dict"].items()})
        model.eval()
        with contextlib.ExitStack() as stack:
            if callable(variant):
                stack.enter_context(variant(model))
            paste = (
                functools.partial(canvas_paste, S=model.img_size) if variant == "paste" else None
            )
            c = compare(model, fx, paste=paste, autocast=variant == "bf16")
            losses = loss_error(model, fx) if variant != "bf16" else "—"
        lines.append(f"| {name} | {c['features']:.1e} | {100 * c['proposals']:.1f} % | "
                     f"{c['detections']} | {c['masks']} | {losses} |")  # fmt: skip
        print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
