#!/usr/bin/env bash
# GPU checks and speed measurements on any machine with one CUDA GPU: the GPU-marked tests, the
# pretraining step at real sizes (the engine's own step: eager, compiled, compiled + CUDA graph;
# ViT-B, then ViT-L and ViT-H), the transfer tasks' training step and evaluation throughput
# (ViTDet-B, UperNet-B, ViT-B finetuning), the attention kernels at the model's shapes, and the
# image pipeline. Writes OUT/ (default gpu_check/): gpu_check.log, step.jsonl (one JSON line per
# benchmark row, with the card's name), tasks.jsonl, attention.jsonl, data.jsonl.
#
#   bash tools/gpu_check.sh [OUT]
#
# Variables: BUDGET   seconds after which no further stage starts (default 540); every stage has
#                     its own limit, so what finished is always written
#            IMAGES   a JPEG folder for the image-pipeline stage (default: Imagenette's train split
#                     under $CROSSMAE_SHARED or ../shared/data; skipped if absent)
#            FROM     the first stage to run (default 1): a second call with FROM=N continues
#                     where a first one stopped at its budget (the log numbers the stages)
#            PYTHON   the interpreter (default: python)
set -uo pipefail
OUT=${1:-gpu_check}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python}
SHARED=${CROSSMAE_SHARED:-$(dirname "$0")/../../shared}
IMAGES=${IMAGES:-$SHARED/data/imagenette/train}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEP=("$PY" -m crossmae benchmark step --batch 256 --steps 30 --warmup 5 --out "$OUT/step.jsonl")
B16=(--models crossmae_vit_base_patch16 --pred-ratios 0.25)

N=0
stage() {  # stage SECONDS CMD...: run unless before FROM or past the budget, at most SECONDS
  local limit=$1
  shift
  N=$((N + 1))
  if ((N < ${FROM:-1})); then return; fi
  if ((SECONDS + 20 > BUDGET)); then echo "## stage $N skipped (time budget): $*"; return; fi
  echo "## stage $N [$SECONDS s] $*"
  timeout -k 5 "$limit" "$@" || echo "## exit $? : $*"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || exit 2
  "$PY" -c "import torch; print('torch', torch.__version__)"
  stage 120 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
  # the fastest configuration (train.compile=true train.cuda_graph=true train.sdpa=efficient)
  stage 120 "${STEP[@]}" "${B16[@]}" --modes graphed --sdpa efficient
  stage 120 "${STEP[@]}" --models mae_vit_base_patch16 --modes compiled graphed
  stage 150 "${STEP[@]}" --models crossmae_vit_base_patch16 --pred-ratios 0.25 0.75 \
    --modes eager compiled
  stage 150 "$PY" -m crossmae benchmark tasks --steps 10 --warmup 3 --out "$OUT/tasks.jsonl"
  stage 150 "$PY" -m crossmae benchmark tasks --compile --steps 10 --warmup 3 \
    --out "$OUT/tasks.jsonl"
  for size in large_patch16 huge_patch14; do
    stage 200 "$PY" -m crossmae benchmark step --models "crossmae_vit_$size" "mae_vit_$size" \
      --pred-ratios 0.25 0.75 --batch 128 --steps 20 --warmup 5 --modes compiled \
      --out "$OUT/step.jsonl"
  done
  stage 60 "$PY" -m crossmae benchmark attention --batch 256 | tee "$OUT/attention.jsonl"
  if [[ -d $IMAGES ]]; then
    stage 60 "$PY" -m crossmae benchmark data --folder "$IMAGES" --images 1000 \
      | tee "$OUT/data.jsonl"
  fi
  echo "## done at $SECONDS s"
} 2>&1 | tee "$OUT/gpu_check.log"
