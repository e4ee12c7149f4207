"""The ViT sizes: one table that drives the model registry (``{crossmae,mae}_vit_{size}_patch{p}``),
the timm model a converted encoder loads into, the transfer configs per size
(``configs/*/..._vit_{size}...``) and the size of a checkpoint's encoder.

Encoder widths are the ViT paper's (Dosovitskiy et al., arXiv:2010.11929) and DeiT's for tiny
(arXiv:2012.12877); decoder widths are CrossMAE's (arXiv:2401.14391, Tables 10 and 18): ViT-S
decoders are 256-d with 8 heads, ViT-B/L/H 512-d with 16 heads. Adding a size is one row here plus
its configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ViTSize:
    """One row: the encoder's and the pretraining decoder's widths.

    Args:
        name: the size's name in model names and config file names.
        patch_sizes: the registered patch sizes (the first is the paper's).
        embed_dim, depth, num_heads: the encoder.
        decoder_embed_dim, decoder_num_heads: the pretraining decoder.
        timm_name: timm's ``VisionTransformer`` of the same widths (``crossmae convert to-timm``).
        in_paper: whether the paper reports this size (tiny is for CPU runs).
    """

    name: str
    patch_sizes: tuple[int, ...]
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_num_heads: int
    timm_name: str
    in_paper: bool = True

    def model_defaults(self, patch_size: int) -> dict[str, Any]:
        """The constructor settings of a registered model of this size."""
        return dict(patch_size=patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, decoder_embed_dim=self.decoder_embed_dim,
                    decoder_num_heads=self.decoder_num_heads)  # fmt: skip


SIZES: tuple[ViTSize, ...] = (
    # DeiT-Ti widths, 8-px patches for 64-px CPU demos as well; not in the paper
    ViTSize("tiny", (16, 8), 192, 12, 3, 128, 4, "vit_tiny_patch16_224", in_paper=False),
    ViTSize("small", (16,), 384, 12, 6, 256, 8, "vit_small_patch16_224"),
    ViTSize("base", (16,), 768, 12, 12, 512, 16, "vit_base_patch16_224"),
    ViTSize("large", (16,), 1024, 24, 16, 512, 16, "vit_large_patch16_224"),
    ViTSize("huge", (14,), 1280, 32, 16, 512, 16, "vit_huge_patch14_224"),
)


def get_size(name: str) -> ViTSize:
    for size in SIZES:
        if size.name == name:
            return size
    raise KeyError(f"unknown ViT size {name!r}; sizes: {', '.join(s.name for s in SIZES)}")


def size_of(embed_dim: int, depth: int, num_heads: int | None = None) -> ViTSize:
    """The row of an encoder's widths (``num_heads`` checked when given); an encoder of other
    widths is an error that names them."""
    for size in SIZES:
        if (size.embed_dim, size.depth) == (embed_dim, depth) and num_heads in (
            None,
            size.num_heads,
        ):
            return size
    heads = f", {num_heads} heads" if num_heads is not None else ""
    raise ValueError(
        f"no ViT size has width {embed_dim} and depth {depth}{heads} "
        f"(sizes: {', '.join(f'{s.name} {s.embed_dim}x{s.depth}' for s in SIZES)})"
    )


def size_of_state_dict(state_dict: dict[str, Any]) -> ViTSize:
    """The row of the encoder in a state dict of any of our layouts or the official one (its
    ``cls_token`` width and the number of its ``blocks.N``, under an optional ``encoder.``)."""
    width, blocks = None, set()
    for key, value in state_dict.items():
        name = key.removeprefix("encoder.")
        if name == "cls_token":
            width = value.shape[-1]
        elif name.startswith("blocks."):
            blocks.add(name.split(".")[1])
    if width is None or not blocks:
        raise ValueError("no ViT encoder (cls_token and blocks.N) in this state dict")
    return size_of(width, len(blocks))
