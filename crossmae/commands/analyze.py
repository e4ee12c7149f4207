"""The paper's analyses of pretrained models, one command each, writing PNG and JSON to --out.

    # Fig. 2: original | masked | MAE | CrossMAE (γ as trained) | CrossMAE decoding all masked
    crossmae analyze recon --crossmae runs/c/checkpoint-last.pt \\
        --mae runs/m/checkpoint-last.pt --images ../shared/data/imagenette/val --out figs
    # App. D / Fig. 5a-b: each decoder block's term of the CrossMAE prediction
    crossmae analyze blocks --crossmae runs/c/checkpoint-last.pt --images DIR --out figs
    # Fig. 5c: inter-block attention weights
    crossmae analyze iba --crossmae runs/c/checkpoint-last.pt --out figs
    # Fig. 1b / Table 6: MAE decoder attention of mask tokens to visible vs mask tokens
    crossmae analyze attention --mae runs/m/checkpoint-last.pt --images DIR --out figs
    # Fig. 7: decoder and total FLOPs (fvcore, cross-checked with torch.utils.flop_counter)
    crossmae analyze flops --models crossmae_vit_base_patch16 mae_vit_base_patch16 --out figs
    crossmae analyze flops --models crossmae_vit_base_patch16 decoder_depth=4 \\
        --out figs

Training-step runtime and memory (Tables 4, 18): crossmae benchmark step. Masked-patch PSNR
(Table 13): crossmae psnr.
--images is an image folder (ImageFolder or flat); without it, scikit-image's bundled photos.
Masks are drawn from --seed, and MAE and CrossMAE see the same masks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from crossmae.analysis import decoder_block_terms, flop_counts, iba_weights, mae_attention_mass
from crossmae.checkpoint import PRETRAIN_FORMAT, load_checkpoint, write_text_atomic
from crossmae.checks import int_at_least
from crossmae.config import parse_settings
from crossmae.data import BuiltinPhotos, EvalTransform, ImageFiles, denormalize
from crossmae.models import MAE, CrossMAE, create_model, model_class
from crossmae.models.masking import normalize_patches, patchify, unpatchify
from crossmae.models.pretrained import model_from_checkpoint
from crossmae.reconstruction import masked_psnr, reconstruct
from crossmae.task import register_command, register_group
from crossmae.visualize import _pyplot


def load_model(path: str, kind: type) -> torch.nn.Module:
    model = model_from_checkpoint(load_checkpoint(path, expect=PRETRAIN_FORMAT)).eval()
    if not isinstance(model, kind):
        raise ValueError(f"{path} holds a {type(model).__name__}, expected a {kind.__name__}")
    return model


def load_images(folder: str | None, n: int, size: int) -> torch.Tensor:
    """``n`` images spread evenly over the folder (or the bundled photos), centre crops."""
    source = ImageFiles(folder) if folder else BuiltinPhotos(len(BuiltinPhotos().names))
    n = min(n, len(source))
    idx = [round(i * (len(source) - 1) / max(n - 1, 1)) for i in range(n)]
    tf = EvalTransform(size)
    return torch.stack([tf(source.load(i)) for i in idx])


def masks(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    return model.mask_sampler(n, None, torch.Generator().manual_seed(seed))


def visible_patches(model: torch.nn.Module, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """(N, L) 1 at the visible patches of these masks."""
    n_keep = model.mask_counts(model.mask_ratio, None).n_keep
    return torch.zeros(ids_shuffle.shape).scatter_(1, ids_shuffle[:, :n_keep], 1.0)


def write_json(out: Path, name: str, record: dict) -> None:
    write_text_atomic(out / name, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / name}")


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    print(f"wrote {path}")


def show(ax, img: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


# ----------------------------------------------------------------------------- commands
def cmd_recon(args) -> int:
    """Fig. 2: reconstructions of MAE and CrossMAE side by side."""
    cross = load_model(args.crossmae, CrossMAE)
    mae = load_model(args.mae, MAE) if args.mae else None
    if mae is not None and (mae.grid_size, mae.patch_size) != (cross.grid_size, cross.patch_size):
        raise ValueError("MAE and CrossMAE must share the image size and patch size")
    imgs = load_images(args.images, args.n, cross.grid_size[0] * cross.patch_size)
    ids = masks(cross, len(imgs), args.seed)
    with torch.no_grad():
        runs = {}
        if mae is not None:
            runs["MAE"] = reconstruct(mae, imgs, ids)
        if cross.pred_ratio < cross.mask_ratio:
            runs[f"CrossMAE γ={cross.pred_ratio:g}"] = reconstruct(cross, imgs, ids)
            runs["CrossMAE, all masked"] = reconstruct(cross, imgs, ids,
                                                       pred_ratio=cross.mask_ratio)  # fmt: skip
        else:  # γ = p: it predicts every masked patch already (a second column would repeat it)
            runs[f"CrossMAE γ=p={cross.pred_ratio:g}"] = reconstruct(cross, imgs, ids)
    psnr = {
        name: masked_psnr(r["pred"], r["original"], r["predicted"], cross.patch_size).tolist()
        for name, r in runs.items()
    }
    first = next(iter(runs.values()))
    cols = [("original", first["original"], None), ("masked", first["masked"], None)]
    cols += [(name, r["pasted"], psnr[name]) for name, r in runs.items()]
    plt = _pyplot()
    fig, axes = plt.subplots(len(imgs), len(cols), squeeze=False,
                             figsize=(1.6 * len(cols), 1.75 * len(imgs) + 0.4))  # fmt: skip
    for r in range(len(imgs)):
        for c, (name, x, db) in enumerate(cols):
            title = name if db is None else f"{name}\nmean {sum(db) / len(db):.2f} dB"
            show(axes[r][c], x[r], title if r == 0 else None)
            if db is not None:
                axes[r][c].set_xlabel(f"{db[r]:.2f} dB", fontsize=7, labelpad=1)
    norm = ("\n(norm-pix outputs shown with each\npatch's true mean and spread)"
            if cross.norm_pix_loss else "")  # fmt: skip
    title = f"PSNR over the masked patches each model predicted{norm}"
    # above the column titles, at the figure's top edge: the tight box saved grows to fit it
    fig.suptitle(title, fontsize=8, va="bottom", y=1.0)
    save_figure(fig, args.out / "reconstructions.png")
    write_json(args.out, "reconstructions.json", {
        "crossmae": args.crossmae, "mae": args.mae, "images": args.images or "skimage photos",
        "seed": args.seed, "mask_ratio": cross.mask_ratio, "pred_ratio": cross.pred_ratio,
        "predicted_patches": {n: int(r["predicted"][0].sum()) for n, r in runs.items()},
        "masked_psnr_db": psnr,
    })  # fmt: skip
    return 0


def cmd_blocks(args) -> int:
    """App. D / Fig. 5a-b: each decoder block's term of the prediction."""
    model = load_model(args.crossmae, CrossMAE)
    imgs = load_images(args.images, args.n, model.grid_size[0] * model.patch_size)
    ids = masks(model, len(imgs), args.seed)
    res = decoder_block_terms(model, imgs, ids, pred_ratio=model.mask_ratio)  # every masked patch
    terms, ids_pred = res["terms"], res["ids_pred"]  # (1 + D, N, n, P)
    p, grid = model.patch_size, model.grid_size
    target = patchify(imgs, p)
    mean = std = None
    if model.norm_pix_loss:
        _, mean, std = normalize_patches(target)
        idx = ids_pred.unsqueeze(-1)
        mean = torch.gather(mean, 1, idx.expand(-1, -1, mean.shape[-1]))
        std = torch.gather(std, 1, idx.expand(-1, -1, std.shape[-1]))

    def to_image(patches: torch.Tensor) -> torch.Tensor:  # (N, n, P) at ids_pred -> (N, 3, H, W)
        full = torch.zeros_like(target).scatter(
            1, ids_pred.unsqueeze(-1).expand(-1, -1, target.shape[-1]), patches
        )
        return unpatchify(full, p, grid)

    pixel_terms = terms * std if std is not None else terms.clone()
    cumulative = pixel_terms.cumsum(0)
    if mean is not None:
        cumulative = cumulative + mean
    labels = ["queries"] + [f"block {i + 1}" for i in range(len(terms) - 1)]
    masked_input = unpatchify(target * visible_patches(model, ids).unsqueeze(-1), p, grid)
    plt = _pyplot()
    rows, ncol = len(imgs), len(terms) + 1
    fig, axes = plt.subplots(2 * rows, ncol, figsize=(1.5 * ncol, 3.0 * rows))
    axes = axes.reshape(2 * rows, ncol)
    for r in range(rows):
        show(axes[2 * r][0], denormalize(imgs[r]), "original" if r == 0 else None)
        show(axes[2 * r + 1][0], denormalize(masked_input[r]), "masked" if r == 0 else None)
        axes[2 * r][0].set_ylabel(f"image {r + 1}\nper-block terms", fontsize=7)
        axes[2 * r + 1][0].set_ylabel(f"image {r + 1}\nrunning sum", fontsize=7)
        for i in range(len(terms)):
            contrib = to_image(pixel_terms[i])[r]
            scale = contrib.abs().max().clamp_min(1e-8)
            top = f"{labels[i]} term" if r == 0 else None
            bottom = (
                ("prediction" if i == len(terms) - 1 else f"sum to {labels[i]}") if r == 0 else None
            )
            show(axes[2 * r][i + 1], 0.5 + 0.5 * contrib / scale, top)
            show(axes[2 * r + 1][i + 1], denormalize(to_image(cumulative[i])[r]), bottom)
    fig.suptitle("top: each term of the prediction (contrast-stretched, grey = 0); "
                 "bottom: their running sum", fontsize=8)  # fmt: skip
    save_figure(fig, args.out / "decoder_blocks.png")
    with torch.no_grad():
        full = model(imgs, ids_shuffle=ids, pred_ratio=model.mask_ratio)["pred"]
    pred = torch.gather(full, 1, ids_pred.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    write_json(args.out, "decoder_blocks.json", {
        "crossmae": args.crossmae, "terms": labels,
        "rms_per_term": terms.pow(2).mean(dim=(1, 2, 3)).sqrt().tolist(),
        "max_abs_error_sum_vs_prediction": (res["pred"] - pred).abs().max().item(),
    })  # fmt: skip
    return 0


def cmd_iba(args) -> int:
    """Fig. 5c: inter-block attention weights."""
    model = load_model(args.crossmae, CrossMAE)
    w = iba_weights(model)  # (decoder blocks, maps)
    names = (["input"] if model.use_input else []) + [f"enc {i + 1}" for i in model.fm_blocks]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.45 * w.shape[1] + 2, 0.4 * w.shape[0] + 1.5))
    im = ax.imshow(w.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(w.shape[0]), [f"dec {i + 1}" for i in range(w.shape[0])], fontsize=7)
    ax.set_xlabel("encoder feature map")
    ax.set_ylabel("decoder block")
    fig.colorbar(im, ax=ax, label=f"weight ({model.decoder.iba.mode})")
    save_figure(fig, args.out / "iba_weights.png")
    write_json(args.out, "iba_weights.json", {
        "crossmae": args.crossmae, "mode": model.decoder.iba.mode, "maps": names,
        "weights": w.tolist(),
    })  # fmt: skip
    return 0


def cmd_attention(args) -> int:
    """Fig. 1b / Table 6: MAE decoder attention to visible vs mask tokens."""
    model = load_model(args.mae, MAE)
    imgs = load_images(args.images, args.n, model.grid_size[0] * model.patch_size)
    res = mae_attention_mass(model, imgs, masks(model, len(imgs), args.seed))
    depth = len(res["visible"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * depth, 3))
    blocks = [f"{i + 1}" for i in range(depth)]
    ax.bar(blocks, res["visible"], label="visible patches")
    ax.bar(blocks, res["cls"], bottom=res["visible"], label="cls token")
    ax.bar(blocks, res["mask"], bottom=res["visible"] + res["cls"], label="mask tokens")
    ax.set_xlabel("MAE decoder block")
    ax.set_ylabel("attention of mask tokens")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, args.out / "mae_attention.png")
    write_json(args.out, "mae_attention.json", {
        "mae": args.mae, "images": len(imgs), "mask_ratio": model.mask_ratio,
        "per_block": {k: res[k].tolist() for k in ("visible", "cls", "mask")},
        "mean": {k: res[k].mean().item() for k in ("visible", "cls", "mask")},
        "per_query_sum_range": [res["per_query_sum"].min().item(),
                                res["per_query_sum"].max().item()],
    })  # fmt: skip
    return 0


def cmd_flops(args) -> int:
    """Fig. 7: decoder and total FLOPs per image."""
    args.settings = parse_settings(args.overrides)
    rows = []
    for name in args.models:
        ratios = args.pred_ratios if issubclass(model_class(name), CrossMAE) else [None]
        for g in ratios:
            settings = {**args.settings, **({} if g is None else {"pred_ratio": g})}
            counts = flop_counts(create_model(name, **settings))
            rows.append({"model": name, "pred_ratio": g, "settings": args.settings, **counts})
            gamma = "-" if g is None else f"{g:g}"
            print(f"{name:28s} γ={gamma:<5} decoder {counts['decoder']:6.2f} total "
                  f"{counts['total']:6.2f} GMACs (torch: {counts['torch_total']:.2f})")  # fmt: skip
    write_json(args.out, "flops.json", {"unit": "GMACs per image, forward", "rows": rows})
    plot_flops(rows, args.out / "flops.png")
    return 0


def plot_flops(rows: list[dict], path: Path) -> None:
    """Decoder and encoder GMACs per image of each (model, γ) as stacked bars (paper Fig. 7)."""
    plt = _pyplot()
    names = [r["model"].replace("_vit_", "\nvit_") +
             ("" if r["pred_ratio"] is None else f"\nγ={r['pred_ratio']:g}")
             for r in rows]  # fmt: skip
    decoder = [r["decoder"] for r in rows]
    rest = [r["total"] - r["decoder"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(rows), 4.0))
    ax.set_ylim(0, 1.25 * max(r["total"] for r in rows))
    ax.bar(names, rest, label="encoder (and the rest)", color="tab:gray")
    ax.bar(names, decoder, bottom=rest, label="decoder", color="tab:orange")
    for i, r in enumerate(rows):
        ax.text(i, r["total"], f"{r['decoder']:.2f} / {r['total']:.2f}", ha="center",
                va="bottom", fontsize=7)  # fmt: skip
    ax.set_ylabel("GMACs per image (forward)")
    ax.set_title("decoder / total GMACs (fvcore, attention counted)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    save_figure(fig, path)


register_group(("analyze",), "the paper's analyses of pretrained models", __doc__)


def _analysis(name: str, func) -> None:
    """``crossmae analyze NAME --out DIR ...`` running ``func``."""

    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, required=True, help="folder for the PNG / JSON")
        p.set_defaults(func=_in_out_folder(func))
        if name == "flops":
            p.add_argument("--models", nargs="+", default=["crossmae_vit_base_patch16",
                                                           "mae_vit_base_patch16"])  # fmt: skip
            p.add_argument("--pred-ratios", nargs="+", type=float, default=[0.25, 0.75])
            p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                           help="constructor settings, e.g. decoder_depth=4")  # fmt: skip
            return
        if name in ("recon", "blocks", "iba"):
            p.add_argument("--crossmae", required=True, help="CrossMAE checkpoint")
        if name in ("recon", "attention"):
            p.add_argument("--mae", required=name == "attention", help="MAE checkpoint")
        if name != "iba":
            p.add_argument("--images", default=None, help="image folder (default: bundled photos)")
            p.add_argument("-n", type=int_at_least(1), default=6, help="images")
            p.add_argument("--seed", type=int, default=0, help="fixes the masks")

    register_command(("analyze", name), help=(func.__doc__ or "").split("\n")[0])(configure)


def _in_out_folder(func):
    def run(args) -> int:
        args.out.mkdir(parents=True, exist_ok=True)
        return func(args)

    return run


for _name, _func in {"recon": cmd_recon, "blocks": cmd_blocks, "iba": cmd_iba,
                     "attention": cmd_attention, "flops": cmd_flops}.items():  # fmt: skip
    _analysis(_name, _func)
