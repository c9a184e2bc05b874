#!/usr/bin/env bash
# GPT-2 pretraining with Megatron-LM: model-parallel size 2 times data parallelism, via torchrun.
# GPUS_PER_NODE (default: every GPU, or 2 CPU ranks), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT;
# RDZV_ENDPOINT, MIN_NODES, MAX_RESTARTS for an elastic run (see _common.sh).
source "$(dirname "$0")/_common.sh"
MP_SIZE=${MP_SIZE:-2}
torchrun_launcher
exec "${TORCHRUN[@]}" pretrain_gpt2.py "${GPT2_ARGS[@]}" --model-parallel-size "$MP_SIZE" "$@"
