"""What each behaviour seg/ once had instead of mmsegmentation's changes, measured on an mmseg
parity file (``mmseg-mae-upernet-parity-v1``, its weights) and the ADE20K samples.

    python tools/seg_deviations.py [--fixture ../shared/fixtures/mmseg_upernet_tiny.pt] \
        [--ade20k ../shared/data/ade20k_samples]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crossmae.data import normalize_pixels
from crossmae.optim import linear_then_poly_lr_at, poly_lr_at
from seg.data import IGNORE, LabelSpec, SegFolder, rescale_size, resize_u8
from seg.export import import_mmseg
from seg.model import SegViT, UperNet, slide_inference
from seg.train import segment, segmentation_losses

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load_model(fixture: Path, dtype: torch.dtype) -> tuple[UperNet, dict]:
    fx = torch.load(fixture, weights_only=True)
    c = fx["config"]
    with tempfile.TemporaryDirectory() as tmp:  # through the importer, as a user's file
        torch.save({"state_dict": fx["state_dict"]}, Path(tmp) / "mmseg.pth")
        settings = {"model": {"out_indices": list(c["out_indices"])}}
        ck = import_mmseg(Path(tmp) / "mmseg.pth", settings)
    backbone = SegViT(img_size=c["img"], patch_size=c["patch"], embed_dim=c["embed"],
                      depth=c["depth"], num_heads=c["heads"], mlp_ratio=c["mlp_ratio"],
                      norm_eps=c["ln_eps"], out_indices=c["out_indices"])  # fmt: skip
    model = UperNet(backbone, c["num_classes"], channels=c["channels"],
                    aux_channels=c["aux_channels"], pool_scales=c["pool_scales"])  # fmt: skip
    model.load_state_dict(ck["model"])
    return model.to(dtype).eval(), fx


def old_test_path(model, img, c, scale) -> torch.Tensor:
    """The former evaluation: normalise, then resize the floats (round(H * f))."""
    H, W = img.shape[-2:]
    f = min(max(scale) / max(H, W), min(scale) / min(H, W))
    x = normalize_pixels(img, dtype=next(model.parameters()).dtype)[None]
    x = F.interpolate(x, size=(round(H * f), round(W * f)), mode="bilinear", align_corners=False)
    logits = slide_inference(model, x, c["num_classes"], crop=c["crop"], stride=c["stride"])
    return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fixture", default=str(SHARED / "fixtures/mmseg_upernet_tiny.pt"))
    parser.add_argument("--ade20k", default=str(SHARED / "data/ade20k_samples"))
    args = parser.parse_args(argv)
    model, fx = load_model(Path(args.fixture), torch.float64)
    c, scale = fx["config"], tuple(fx["pipeline"]["scale"])
    folder = SegFolder(args.ade20k, "validation", LabelSpec(c["num_classes"], None, True))

    # 2: the loss normaliser, on the fixture's first window
    with torch.no_grad():
        out = model(fx["input"][..., : c["crop"], : c["crop"]])
    label = fx["label"][None, : c["crop"], : c["crop"]].long()
    now = segmentation_losses(out, label, aux_weight=0.4)["decode_loss_ce"]
    old = segmentation_losses(out, label, aux_weight=0.4, avg_non_ignore=True)["decode_loss_ce"]
    frac = float((label != IGNORE).float().mean())
    print(f"2. decode loss {float(now):.4f} (all pixels) vs {float(old):.4f} (labelled only): "
          f"x{float(old / now):.3f}; {100 * frac:.1f} % of the window is labelled")  # fmt: skip

    # 4 and 7: the test path's resizing, and bf16 evaluation, on the ADE20K samples
    same_resize, same_bf16, grey, changed, n = 0, 0, 0.0, 0.0, 0
    fp32, _ = load_model(Path(args.fixture), torch.float32)
    for i in range(len(folder)):
        img, lab, _ = folder[i]
        new = segment(model, img, c["num_classes"], crop=c["crop"], stride=c["stride"],
                      scale=scale).argmax(1)  # fmt: skip
        same_resize += int((old_test_path(model, img, c, scale).argmax(1) == new).sum())
        ref = segment(fp32, img, c["num_classes"], crop=c["crop"], stride=c["stride"],
                      scale=scale).argmax(1)  # fmt: skip
        low = segment(fp32, img, c["num_classes"], crop=c["crop"], stride=c["stride"],
                      scale=scale, precision=torch.bfloat16).argmax(1)  # fmt: skip
        same_bf16 += int((low == ref).sum())
        n += lab.numel()
        H, W = img.shape[-2:]
        size = rescale_size(H, W, scale)
        hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        u8 = torch.from_numpy(resize_u8(hwc, size)).permute(2, 0, 1)
        fl = F.interpolate(img[None].double(), size=size, mode="bilinear", align_corners=False)[0]
        d = (fl - u8.double()).abs()
        grey = max(grey, float(d.max()))
        changed += float((d > 0.5).double().mean())
    k = len(folder)
    print(f"4. test input: floats resized vs uint8 (OpenCV): up to {grey:.2f} grey levels, "
          f"{100 * changed / k:.1f} % of values more than 0.5 apart; predictions "
          f"{100 * same_resize / n:.2f} % equal ({k} ADE20K images)")  # fmt: skip
    print(f"7. bf16 evaluation (float32 model): predictions {100 * same_bf16 / n:.2f} % equal "
          "to fp32")  # fmt: skip

    # 5: the two schedules
    gap = max(abs(linear_then_poly_lr_at(s, base_lr=1.0, total_steps=160000, warmup_steps=1500)
                  - poly_lr_at(s, base_lr=1.0, total_steps=160000, warmup_steps=1500))
              for s in range(160000))  # fmt: skip
    print(f"5. mmseg 1.x vs 0.x schedule (160k, 1500 warmup): at most {100 * gap:.2f} % of the "
          "base lr apart")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
