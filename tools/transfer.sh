#!/usr/bin/env bash
# Transfer evaluation of one pretraining checkpoint: ImageNet linear probe and finetuning, COCO
# ViTDet Mask R-CNN, ADE20K UperNet, then one results table (OUT/results.md and results.json:
# top-1, linear-probe top-1, AP box, AP mask, mIoU, with each stage's config and the checkpoint).
#
#   IMAGENET=/data/imagenet COCO=/data/coco ADE20K=/data/ADEChallengeData2016 \
#     tools/transfer.sh runs/crossmae_b/checkpoint-last.pt [OUT]
#   tools/transfer.sh --smoke runs/demo/checkpoint-last.pt /tmp/smoke   # CPU, minutes, shared data
#
# Options:   --smoke           every stage for a few iterations on tiny splits of ../shared/data
#                              (or $CROSSMAE_SHARED) on the CPU
#            --stages "a b"    a subset of: linprobe finetune det seg (default: all four)
# Variables: IMAGENET (train/ and val/ ImageFolders), COCO (annotations/instances_{train,val}2017.json,
#            train2017/, val2017/), ADE20K (images/ and annotations/ with training/ validation/):
#            needed by the stages that read them.
#            ARCH     config size: small | base | large | huge (default: read from the checkpoint)
#            NPROC    processes (GPUs) per node (default: the GPUs nvidia-smi lists, else 1;
#                     with LAUNCHER=slurm, 8)
#            NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun (run this script
#                     on every node with the same OUT on a shared filesystem)
#            LAUNCHER torchrun (default) | slurm: each stage becomes a Slurm job through
#                     tools/submit.py (submitit), waited for; SLURM_ARGS adds its options
#                     (e.g. "--partition learn --timeout-min 4320")
#            LINPROBE_ARGS, FINETUNE_ARGS, DET_ARGS, SEG_ARGS   extra key=value overrides
#            PYTHON   the interpreter (default: python)
# OUT defaults to the checkpoint's folder + /transfer. A stage whose final results.json exists is
# skipped; one that was interrupted resumes from its last checkpoint (--resume auto). Stage logs:
# OUT/<stage>.log. Exit status 1 if any stage did not finish.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "transfer.sh: $*" >&2; exit 2; }

SMOKE=0
STAGES=(linprobe finetune det seg)
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1; shift ;;
    --stages) [[ $# -ge 2 ]] || die "--stages needs a value"; read -ra STAGES <<<"$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 && $# -le 2 ]] || { usage >&2; exit 2; }
for s in "${STAGES[@]}"; do
  [[ $s =~ ^(linprobe|finetune|det|seg)$ ]] || die "unknown stage '$s' (linprobe finetune det seg)"
done
[[ -f $1 ]] || die "checkpoint $1 does not exist"
CKPT=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
OUT=${2:-$(dirname "$CKPT")/transfer$([[ $SMOKE == 1 ]] && echo -smoke)}
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-torchrun}
[[ $LAUNCHER =~ ^(torchrun|slurm)$ ]] || die "LAUNCHER must be torchrun or slurm, not '$LAUNCHER'"
cd "$REPO" || exit 2

if [[ $SMOKE == 1 ]]; then
  NPROC=${NPROC:-1}
  SHARED=${CROSSMAE_SHARED:-$REPO/../shared}
  [[ -d $SHARED/data ]] || die "--smoke reads $SHARED/data (set CROSSMAE_SHARED)"
  SHARED=$(cd "$SHARED" && pwd)
  D=$OUT/smoke_data
  $PY tools/transfer_steps.py smoke-data "$SHARED" "$D" || die "could not prepare $D"
  CPU=(data.num_workers=0 train.device=cpu train.precision=fp32 log.every_steps=1)
  CLS=(data.train="$D/cls/train" data.val="$D/cls/val" data.img_size=32 train.epochs=1
    optim.warmup_epochs=0 train.batch_size=8)
  LINPROBE=(configs/cls/linprobe_cifar10_tiny.yaml "${CLS[@]}" "${CPU[@]}")
  FINETUNE=(configs/cls/finetune_cifar10_tiny.yaml "${CLS[@]}" "${CPU[@]}")
  DET=(configs/det/mask_rcnn_coco128_small.yaml data.train_json="$D/det/small.json"
    data.train_images="$SHARED/data/coco128/train2017" data.val_json="$D/det/small.json"
    data.val_images="$SHARED/data/coco128/train2017" model.img_size=128 model.patch_size=16
    model.window=4 train.steps=2 train.batch_size=2 optim.warmup_steps=1 "${CPU[@]}")
  SEG=(configs/seg/upernet_vit_base_ade20k_160k.yaml data.root="$SHARED/data/ade20k_samples"
    data.train_split=validation data.val_split=validation data.crop=64 "data.scale=[128,64]"
    eval.stride=43 model.channels=16 train.steps=2 train.batch_size=2 optim.warmup_steps=1
    "${CPU[@]}")
else
  if [[ $LAUNCHER == slurm ]]; then
    NPROC=${NPROC:-8}  # GPUs per node of the Slurm job (not of the machine submitting it)
  else
    NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    [[ ${NPROC:-0} -ge 1 ]] || NPROC=1
  fi
  ARCH=${ARCH:-$($PY tools/transfer_steps.py arch "$CKPT")} || die "set ARCH (small|base|large|huge)"
  missing=()
  need() { [[ " ${STAGES[*]} " == *" $1 "* && -z ${!2:-} ]] && missing+=("$2 (for $1)"); }
  need linprobe IMAGENET; need finetune IMAGENET; need det COCO; need seg ADE20K
  [[ ${#missing[@]} == 0 ]] || die "set the dataset root(s): ${missing[*]}"
  LINPROBE=(configs/cls/linprobe_vit_$ARCH.yaml data.train="${IMAGENET:-}/train"
    data.val="${IMAGENET:-}/val")
  FINETUNE=(configs/cls/finetune_vit_$ARCH.yaml data.train="${IMAGENET:-}/train"
    data.val="${IMAGENET:-}/val")
  DET=(configs/det/mask_rcnn_vit_${ARCH}_*ep.yaml
    data.train_json="${COCO:-}/annotations/instances_train2017.json"
    data.train_images="${COCO:-}/train2017"
    data.val_json="${COCO:-}/annotations/instances_val2017.json" data.val_images="${COCO:-}/val2017")
  SEG=(configs/seg/upernet_vit_${ARCH}_ade20k_160k.yaml data.root="${ADE20K:-}")
  for s in "${STAGES[@]}"; do
    v=${s^^}[0]
    [[ -f ${!v} ]] || die "no $s config for ARCH=$ARCH: ${!v} does not exist"
    arr=${s^^}[@]
    for kv in "${!arr}"; do  # every dataset path a stage reads must exist before anything runs
      [[ $kv == *=/* && ! -e ${kv#*=} ]] && die "$s: ${kv%%=*}=${kv#*=} does not exist"
    done
  done
fi

if [[ ${NNODES:-1} -gt 1 ]]; then
  TORCHRUN=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}"
    --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}")
else
  TORCHRUN=(--standalone --nnodes 1)
fi

launch() {  # launch "MODULE COMMAND" ARGS...: one stage on every process of every node
  local task=$1
  shift
  if [[ $LAUNCHER == slurm ]]; then
    # shellcheck disable=SC2086
    $PY tools/submit.py --task "$task" --wait --nodes "${NNODES:-1}" --gpus-per-node "$NPROC" \
      ${SLURM_ARGS:-} "$@"
  else
    # shellcheck disable=SC2086  # $task: the command and its action, two words
    $PY -m torch.distributed.run "${TORCHRUN[@]}" --nproc-per-node "$NPROC" \
      -m crossmae $task "$@" --resume auto
  fi
}

failed=()
for s in "${STAGES[@]}"; do
  case $s in
    linprobe) task="cls linprobe" extra=${LINPROBE_ARGS:-} ;;
    finetune) task="cls finetune" extra=${FINETUNE_ARGS:-} ;;
    det) task="det train" extra=${DET_ARGS:-} ;;
    seg) task="seg train" extra=${SEG_ARGS:-} ;;
  esac
  if $PY tools/transfer_steps.py done "$OUT/$s"; then
    echo "== $s: done already ($OUT/$s/results.json), skipped"
    continue
  fi
  arr=${s^^}[@]
  args=("${!arr}")
  echo "== $s: $task --config ${args[0]} (log: $OUT/$s.log)"
  # shellcheck disable=SC2086
  if ! launch "$task" --config "${args[0]}" "${args[@]:1}" encoder.checkpoint="$CKPT" \
    output_dir="$OUT/$s" $extra 2>&1 | tee -a "$OUT/$s.log"; then
    echo "== $s: FAILED (see $OUT/$s.log)"
    failed+=("$s")
  fi
done

$PY tools/transfer_steps.py table "$OUT" "$CKPT" "${STAGES[@]}"
table=$?
[[ ${#failed[@]} == 0 ]] || { echo "transfer.sh: failed stage(s): ${failed[*]}" >&2; exit 1; }
exit $table
