#!/usr/bin/env bash
# The shipped recipes on one node of 8 smaller cards (docs/results.md, "24 GB and 40 GB cards"):
# for each, the split `train.gpu_memory=GIB` chooses (the largest micro-batch that fits, with
# the accumulation that keeps the recipe's batch; activation checkpointing if none fits), planned
# on fake tensors. Seconds (pretraining) to minutes (detection) per line on a CPU; no GPU is
# touched.
set -euo pipefail
cd "$(dirname "$0")/.."
fit() { crossmae benchmark memory --gpus 8 "$@" 2>/dev/null | grep 'train.gpu_memory=' || true; }
for card in 40 24; do
  for config in pretrain/crossmae_vit_base_800ep_pred0.25 pretrain/crossmae_vit_large_800ep_pred0.25 \
      pretrain/crossmae_vit_huge_800ep_pred0.25 pretrain/mae_vit_base_800ep cls/finetune_vit_large \
      cls/finetune_vit_huge seg/upernet_vit_large_ade20k_160k det/mask_rcnn_vit_base_100ep; do
    fit --config "configs/$config.yaml" "train.gpu_memory=$card"
  done
done
fit --config configs/det/mask_rcnn_vit_huge_75ep.yaml train.gpu_memory=24
