"""Frozen-encoder features and the kNN classifier (k = 20, cosine similarity, votes weighted by
exp(similarity / T); Wu et al. 2018, arXiv:1805.01978, as used by DINO): a cheap accuracy monitor
for any checkpoint, also run periodically during pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import Labelled, classify_eval_transform
from .evaluation import DatasetEvaluator, inference_on_dataset
from .models import VisionTransformer


def block_features(encoder: VisionTransformer, imgs: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, blocks, 2, D): for each of the encoder's last ``blocks`` blocks (oldest first), its
    cls token and the mean of its patch tokens, each after the encoder's final ``norm`` (for
    the last block: what ``forward_features`` gives), as dinov2's linear evaluation takes them."""
    if not 1 <= blocks <= encoder.depth:
        raise ValueError(f"the last {blocks} blocks of an encoder of {encoder.depth}")
    x = encoder.prepend_cls(encoder.patch_tokens(imgs))
    out = []
    for i in range(encoder.depth):
        x = encoder.run_block(i, x)
        if i >= encoder.depth - blocks:
            t = encoder.norm(x)
            out.append(torch.stack([t[:, 0], t[:, encoder.num_prefix_tokens :].mean(dim=1)], 1))
    return torch.stack(out, dim=1)


class BlockFeatures(nn.Module):
    """``block_features`` of ``encoder``'s last ``blocks`` blocks as a module (the evaluation
    loop's model)."""

    def __init__(self, encoder: VisionTransformer, blocks: int):
        super().__init__()
        self.encoder, self.blocks = encoder, blocks

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return block_features(self.encoder, imgs, self.blocks)


class FeatureEvaluator(DatasetEvaluator):
    """Collects the model's outputs as float32 features and the labels of ``(images, labels,
    indices)`` batches: ``evaluate()`` gives ``{"features", "labels"}`` of every image, in the
    dataset's order."""

    desc = "features"

    def process(self, inputs, outputs: torch.Tensor) -> None:
        _, y, i = inputs
        self.results.append((i, outputs.float().cpu(), y))

    def evaluate(self) -> dict[str, torch.Tensor]:
        order = torch.cat([r[0] for r in self.results]).argsort()
        return {"features": torch.cat([r[1] for r in self.results])[order],
                "labels": torch.cat([r[2] for r in self.results])[order]}  # fmt: skip


def extract_block_features(
    encoder: VisionTransformer,
    source,
    *,
    img_size: int,
    blocks: int = 1,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_features`` (N, blocks, 2, D) float32 and labels (N,) of every image of
    ``source``, in order, in full precision (``FeatureEvaluator``; the encoder's mode is restored
    after). Under torch.distributed each process extracts its own shard and all receive the full,
    ordered result."""
    if not 1 <= blocks <= encoder.depth:
        raise ValueError(f"the last {blocks} blocks of an encoder of {encoder.depth}")
    ds = Labelled(source, classify_eval_transform(img_size))
    out = inference_on_dataset(BlockFeatures(encoder.to(device), blocks), ds, FeatureEvaluator(),
                               precision="fp32", batch_size=batch_size,
                               num_workers=num_workers)  # fmt: skip
    return out["features"], out["labels"]


POOLS = {"cls": [0], "avg": [1], "cls+avg": [0, 1]}  # which of block_features' two vectors


def pooled(features: torch.Tensor, pool: str, blocks: int = 1) -> torch.Tensor:
    """(N, n, 2, D) block features -> (N, F): the ``pool`` vectors (cls token, patch mean or
    both) of the last ``blocks`` blocks, concatenated (dinov2's linear-evaluation input)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    return features[:, -blocks:, POOLS[pool]].flatten(1)


def extract_features(encoder: VisionTransformer, source, *, img_size: int, pool: str = "cls",
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Features (N, D) float32 and labels (N,) of every image of ``source``: the cls token
    (``pool="cls"``) or the mean of the patch tokens (``"avg"``) after the encoder's ``norm``
    (``extract_block_features``' keyword arguments)."""
    if pool not in ("cls", "avg"):
        raise ValueError(f"pool must be 'cls' or 'avg', got {pool!r}")
    feats, labels = extract_block_features(encoder, source, img_size=img_size, **kwargs)
    return pooled(feats, pool), labels


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test, C): each test feature's k nearest training features by cosine
    similarity vote for their class with weight exp(similarity / temperature)."""
    return knn_classify_ks(train_feats, train_labels, test_feats, ks=[k], num_classes=num_classes,
                           temperature=temperature, chunk=chunk)[k]  # fmt: skip


def knn_classify_ks(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    ks: list[int],
    num_classes: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """``knn_classify``'s scores for each k of ``ks`` from one similarity search: the nearest
    max(ks) neighbours, the first k of them voting for each k."""
    train = F.normalize(train_feats.float(), dim=1)
    top = min(max(ks), len(train))
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, nn_idx = (q @ train.T).topk(top, dim=1)  # (n, top), most similar first
        votes = F.one_hot(train_labels[nn_idx], num_classes).float()  # (n, top, C)
        weighted = votes * (sim / temperature).exp().unsqueeze(-1)
        for k in ks:
            scores[k].append(weighted[:, : min(k, top)].sum(dim=1))
    return {k: torch.cat(v) for k, v in scores.items()}


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """How many rows have their label among the k best scores, per k; counts, so that shards can
    be summed. A k that is not below the number of classes is left out (always 100 %: top-5 of
    5 classes or fewer says nothing); top-1 is always there."""
    ks = [k for k in ks if k < scores.shape[1] or k == 1]
    hit = scores.topk(max(ks), dim=1).indices == labels.unsqueeze(1)  # (N, max k)
    return {k: hit[:, :k].any(dim=1).sum() for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (``topk_hits``: a k not below the number of classes is left
    out)."""
    hits = topk_hits(scores, labels, ks)
    return {f"top{k}": 100.0 * n.item() / len(labels) for k, n in hits.items()}
