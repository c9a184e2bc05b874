#!/usr/bin/env bash
# GPT-2 pretraining with Megatron-LM on one process (one GPU, or the CPU).
# With no arguments: a small GPT-2 on the built-in demo corpus. MODEL=345M TRAIN_DATA=webtext
# VOCAB_FILE=... MERGE_FILE=... selects the original configuration. Extra flags are passed on.
source "$(dirname "$0")/_common.sh"
python pretrain_gpt2.py "${GPT2_ARGS[@]}" "$@" || exit $?
show_demo_samples
