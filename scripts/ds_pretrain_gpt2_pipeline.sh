#!/usr/bin/env bash
# GPT-2 pretraining with 3D parallelism through DeepSpeed's pipeline engine:
# PIPE_SIZE pipeline stages (default 2) x MP_SIZE tensor-parallel (default 1) x the rest data
# parallel, ZeRO stage 1 (ZeRO 2/3 cannot be combined with pipelining). MICRO_BATCHES per step
# (default 4) fill the pipeline. Without a GPU: 2 CPU ranks. Extra flags are passed on.
if [ "${MODEL:-demo}" = demo ]; then  # micro batches of 2, 4 per step: 60 steps on CPU ranks
  TRAIN_ITERS=${TRAIN_ITERS:-60}; BATCH_SIZE=${BATCH_SIZE:-2}
fi
source "$(dirname "$0")/_common.sh"
PIPE_SIZE=${PIPE_SIZE:-2}
MP_SIZE=${MP_SIZE:-1}
MICRO_BATCHES=${MICRO_BATCHES:-4}
DS_CONFIG=${DS_CONFIG:-scripts/ds_zero1_config.json}
deepspeed_launcher
exec "${DEEPSPEED[@]}" pretrain_gpt2.py "${GPT2_ARGS[@]}" \
  --pipe-parallel-size "$PIPE_SIZE" --model-parallel-size "$MP_SIZE" \
  --gradient-accumulation-steps "$MICRO_BATCHES" --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
