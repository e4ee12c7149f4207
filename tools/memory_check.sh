#!/usr/bin/env bash
# The memory planner's estimates beside numbers measured on GPUs (docs/results.md, "GPU memory
# planned on a CPU"): CrossMAE-B (γ 0.25) and MAE-B pretraining, batch 256 on one GPU, bf16
# (measured on one H100: 10.2 and 13.1 GiB); ViTDet Mask R-CNN B / L / H, one 1024-px image per
# GPU on 64 GPUs, fp16, with detectron2's attention arithmetic (its projects/ViTDet README:
# 10.9, 20.9, 31.5 GB) and with ours. Seconds to a minute each on a CPU; no GPU is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
mem() { crossmae benchmark memory "$@" 2>/dev/null | grep -v '^{'; }
mem --config configs/pretrain/crossmae_vit_base_800ep_pred0.25.yaml --gpus 1 train.batch_size=256
mem --config configs/pretrain/mae_vit_base_800ep.yaml --gpus 1 train.batch_size=256
for size in base_100ep large_100ep huge_75ep; do
  for attention in explicit sdpa; do
    mem --config "configs/det/mask_rcnn_vit_${size}.yaml" --gpus 64 model.attention=$attention
  done
done
