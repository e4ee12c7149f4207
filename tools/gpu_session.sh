#!/usr/bin/env bash
# The one prepared device run for the performance issue: GPU-marked tests, the training-step
# benchmark at real sizes (eager and compiled), the image-pipeline benchmark (CPU and GPU decode),
# then extra variants while time is left. Everything it prints is recorded in docs/results.md
# with the card's name.
#
# Before the call, on the development machine (the device gets the checkout only):
#   mkdir -p .device_data && cp -r ../shared/data/imagenette/train .device_data/imagenette_train
# Device call: command "bash tools/gpu_session.sh", carry [".device_data"], timeout_s 480.
# The device image has torch, timm and pytest but not this package's other dependencies; the
# code used here imports only torch, torchvision, PIL and numpy, so PYTHONPATH suffices.
# `bash tools/gpu_session.sh profile` instead runs the GPU tests and kernel-time tables of the
# CrossMAE-B step (eager and compiled), about 3 minutes.
# Each stage has its own time limit and the extras stop at BUDGET seconds, so the log and the
# JSON lines of whatever finished always come back.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-380}
mkdir -p "$OUT"
B=(python3 tools/benchmark.py step --batch 256 --steps 30 --warmup 5 --out "$OUT/step.jsonl")
stage() {  # stage SECONDS CMD...: run unless past the budget, never longer than SECONDS
  local limit=$1
  shift
  if ((SECONDS + 20 > BUDGET)); then echo "## skipped (time budget): $*"; return; fi
  echo "## [$SECONDS s] $*"
  timeout -k 5 "$limit" "$@" || echo "## exit $? : $*"
}
if [[ ${1:-} == profile ]]; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    stage 100 python3 -m pytest -q -m gpu tests/test_fast_path.py tests/test_gpu.py \
      -p no:cacheprovider
    for mode in eager compiled; do
      stage 170 "${B[@]}" --models crossmae_vit_base_patch16 --pred-ratios 0.25 \
        --modes $mode --profile "$OUT/profile.txt"
    done
  } 2>&1 | tee "$OUT/gpu_profile.log"
  exit
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, torch.cuda.get_device_name())"
  stage 100 python3 -m pytest -q -m gpu tests/test_fast_path.py tests/test_gpu.py \
    -p no:cacheprovider
  stage 60 "${B[@]}" --models crossmae_vit_base_patch16 mae_vit_base_patch16 --modes eager
  stage 200 "${B[@]}" --models crossmae_vit_base_patch16 mae_vit_base_patch16 --modes compiled
  stage 150 "${B[@]}" --models crossmae_vit_base_patch16 --pred-ratios 0.25 --modes compiled \
    --compile-mode reduce-overhead
  stage 60 python3 tools/benchmark.py data --folder .device_data/imagenette_train \
    --images 1000 --batch 128
  # extras, eager: the unfused decoder (same card), other sizes, a deeper decoder
  stage 30 "${B[@]}" --models crossmae_vit_base_patch16 --pred-ratios 0.25 --modes eager \
    --plain-decoder
  stage 40 "${B[@]}" --models crossmae_vit_small_patch16 mae_vit_small_patch16 \
    --pred-ratios 0.25 --modes eager
  stage 40 "${B[@]}" --models crossmae_vit_large_patch16 mae_vit_large_patch16 \
    --pred-ratios 0.25 --modes eager
  stage 40 "${B[@]}" --models crossmae_vit_base_patch16 --pred-ratios 0.25 --modes eager \
    --decoder-depth 8
  stage 60 "${B[@]}" --models crossmae_vit_huge_patch14 mae_vit_huge_patch14 \
    --pred-ratios 0.25 --modes eager --grad-checkpointing
  stage 60 "${B[@]}" --models crossmae_vit_large_patch16 --pred-ratios 0.25 --modes compiled
  echo "## done at $SECONDS s"
} 2>&1 | tee "$OUT/gpu_session.log"
