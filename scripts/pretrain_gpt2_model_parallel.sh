#!/usr/bin/env bash
# GPT-2 pretraining with Megatron-LM: model-parallel size 2 times data parallelism, via torchrun.
# GPUS_PER_NODE (default: every GPU, or 2 CPU ranks), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
source "$(dirname "$0")/_common.sh"
MP_SIZE=${MP_SIZE:-2}
exec torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pretrain_gpt2.py "${GPT2_ARGS[@]}" --model-parallel-size "$MP_SIZE" "$@"
