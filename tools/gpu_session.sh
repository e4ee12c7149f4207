#!/usr/bin/env bash
# The one prepared device run for the performance issue: GPU-marked tests, the training-step
# benchmark at real sizes (eager and compiled), and the image-pipeline benchmark (CPU and GPU
# decode). Everything it prints is recorded in docs/results.md with the card's name.
#
# Before the call, on the development machine (the device gets the checkout only):
#   mkdir -p .device_data && cp -r ../shared/data/imagenette/train .device_data/imagenette_train
# Device call: command "bash tools/gpu_session.sh", carry [".device_data"], timeout_s 540.
# The device image has torch, timm and pytest but not this package's other dependencies; the
# code used here imports only torch, torchvision, PIL and numpy, so PYTHONPATH suffices.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  python3 -m pytest -q -m gpu tests/test_fast_path.py -p no:cacheprovider
  python3 tools/benchmark.py step --models crossmae_vit_base_patch16 mae_vit_base_patch16 \
      --pred-ratios 0.25 0.75 --batch 256 --modes eager compiled --out "$OUT/step.jsonl"
  python3 tools/benchmark.py data --folder .device_data/imagenette_train --images 1000 --batch 128
} 2>&1 | tee "$OUT/gpu_session.log"
