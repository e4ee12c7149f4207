#!/usr/bin/env bash
# Transfer evaluation of one pretraining checkpoint: every registered transfer stage (ImageNet
# linear probe and finetuning, COCO ViTDet Mask R-CNN, ADE20K UperNet), then one results table
# (OUT/results.md and results.json).
#
#   IMAGENET=/data/imagenet COCO=/data/coco ADE20K=/data/ADEChallengeData2016 \
#     tools/transfer.sh runs/crossmae_b/checkpoint-last.pt [OUT]
#   tools/transfer.sh --smoke runs/demo/checkpoint-last.pt /tmp/smoke   # CPU, minutes, shared data
#   tools/transfer.sh --list                                            # the stages
#   tools/transfer.sh --curve runs/crossmae_b [OUT] [--watch]   # every checkpoint the run kept
#
# The stages, their configs per encoder size and their result keys come from the task registry:
# this script runs `crossmae transfer` (`tools/transfer.sh --help` lists its options and the
# variables it reads: dataset roots, ARCH, NPROC, NNODES, LAUNCHER, SLURM_ARGS, <STAGE>_ARGS,
# PYTHON).
set -euo pipefail
exec "${PYTHON:-python}" -m crossmae transfer "$@"
