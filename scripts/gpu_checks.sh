#!/usr/bin/env bash
# The measurements only a GPU can give, as one short run for a lent GPU machine:
#   bash scripts/gpu_checks.sh [OUT_DIR] [CHECKS...]      CHECKS: 345M 1.5B fp16-train (default: all)
# * 345M, 1.5B: tools/bench_vs_hf.py at GPT-2 345M (24 x 1024, 16 heads) and 1.5B (48 x 1600,
#   25 heads), sequence 1024, bf16 and fp16: the Megatron path (eager and --compile), DeepSpeed
#   ZeRO 0 and Hugging Face GPT2LMHeadModel side by side; MFU against the data-sheet peak.
# * fp16-train: the demo through scripts/pretrain_gpt2.sh and scripts/ds_pretrain_gpt2.sh in fp16
#   (dynamic loss scale from 2^32; the first steps overflow and are skipped).
# Tables and JSON go to OUT_DIR (default bench_out/gpu); record them in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-bench_out/gpu}
shift || true
CHECKS=("$@")
[ ${#CHECKS[@]} -gt 0 ] || CHECKS=(345M 1.5B fp16-train)
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible; scripts/gpu_checks.sh is for a GPU machine" >&2
  exit 2
fi
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
PATHS=(megatron megatron-compile deepspeed-zero0 hf)

vs_hf() {  # name layers hidden heads batch
  python tools/bench_vs_hf.py --num-layers "$2" --hidden-size "$3" --num-attention-heads "$4" \
    --seq-length 1024 --batch-size "$5" --precisions bf16 fp16 --steps 10 --warmup-steps 3 \
    --paths "${PATHS[@]}" --output "$OUT/vs_hf_$1.json" | tee "$OUT/vs_hf_$1.md"
}

for check in "${CHECKS[@]}"; do
  case "$check" in
    345M) vs_hf 345M 24 1024 16 8 ;;
    1.5B) vs_hf 1.5B 48 1600 25 4 ;;
    fp16-train)
      scratch=$(mktemp -d)
      PRECISION=fp16 TRAIN_ITERS=60 CHECKPOINT_PATH="$scratch/megatron" \
        bash scripts/pretrain_gpt2.sh > "$OUT/fp16_pretrain_gpt2.log" 2>&1
      PRECISION=fp16 TRAIN_ITERS=60 CHECKPOINT_PATH="$scratch/deepspeed" \
        bash scripts/ds_pretrain_gpt2.sh > "$OUT/fp16_ds_pretrain_gpt2.log" 2>&1
      grep -h " iteration " "$OUT"/fp16_*.log | cut -c1-200
      rm -rf "$scratch" ;;
    *) echo "error: unknown check $check (choose from 345M 1.5B fp16-train)" >&2; exit 2 ;;
  esac
done
echo "wrote $OUT"
