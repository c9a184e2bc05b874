#!/usr/bin/env bash
# BERT pretraining through DeepSpeed (ZeRO stage 1 by default) on 2 ranks (CPU: gloo): the same
# small encoder on the demo corpus as scripts/pretrain_bert.sh (settings: scripts/_bert_common.sh).
# DS_CONFIG=path selects another DeepSpeed config. Extra flags are passed on.
source "$(dirname "$0")/_bert_common.sh"
DS_CONFIG=${DS_CONFIG:-scripts/ds_zero1_config.json}
[ -f "$DS_CONFIG" ] || { echo "error: DeepSpeed config $DS_CONFIG does not exist" >&2; exit 2; }
exec deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" pretrain_bert.py \
  "${BERT_ARGS[@]}" --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
