#!/usr/bin/env bash
# GPT-2 pretraining through DeepSpeed with model-parallel size 2 times ZeRO data parallelism.
# Multi-node: HOSTFILE=path (DeepSpeed's "host slots=N" format); NNODES limits the nodes used.
# ZERO_STAGE, OFFLOAD, DS_CONFIG as in ds_pretrain_gpt2.sh. Extra flags are passed on.
source "$(dirname "$0")/_common.sh"
MP_SIZE=${MP_SIZE:-2}
ZERO_STAGE=${ZERO_STAGE:-1}
if [ "${OFFLOAD:-0}" = 1 ]; then DEFAULT_CONFIG=scripts/ds_zero2_offload_config.json
else DEFAULT_CONFIG=scripts/ds_zero${ZERO_STAGE}_config.json; fi
DS_CONFIG=${DS_CONFIG:-$DEFAULT_CONFIG}
[ -f "$DS_CONFIG" ] || { echo "error: DeepSpeed config $DS_CONFIG does not exist (ZERO_STAGE is 0, 1, 2 or 3)" >&2; exit 2; }
deepspeed_launcher
exec "${DEEPSPEED[@]}" pretrain_gpt2.py "${GPT2_ARGS[@]}" --model-parallel-size "$MP_SIZE" \
  --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
