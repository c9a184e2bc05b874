#!/usr/bin/env bash
# GPT-2 pretraining through DeepSpeed on one node, every local device (CPU ranks without a GPU).
# ZERO_STAGE=0|1|2|3 (default 1), OFFLOAD=1 for ZeRO 2 with CPU optimizer offload,
# DS_CONFIG=path to use your own config; HOSTFILE (and NO_SSH=1, NODE_RANK) for several nodes
# (see _common.sh). Extra flags are passed on.
source "$(dirname "$0")/_common.sh"
ZERO_STAGE=${ZERO_STAGE:-1}
if [ "${OFFLOAD:-0}" = 1 ]; then DEFAULT_CONFIG=scripts/ds_zero2_offload_config.json
else DEFAULT_CONFIG=scripts/ds_zero${ZERO_STAGE}_config.json; fi
DS_CONFIG=${DS_CONFIG:-$DEFAULT_CONFIG}
[ -f "$DS_CONFIG" ] || { echo "error: DeepSpeed config $DS_CONFIG does not exist (ZERO_STAGE is 0, 1, 2 or 3)" >&2; exit 2; }
deepspeed_launcher
"${DEEPSPEED[@]}" pretrain_gpt2.py \
  "${GPT2_ARGS[@]}" --deepspeed --deepspeed_config "$DS_CONFIG" "$@" || exit $?
show_demo_samples
