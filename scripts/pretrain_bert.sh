#!/usr/bin/env bash
# BERT pretraining (masked LM + sentence-order head) with Megatron-LM on 2 ranks (CPU: gloo).
# With no arguments: a small post-LayerNorm encoder on the built-in demo corpus with the demo's
# 8000-token WordPiece vocabulary (both built once under data/demo). Settings: scripts/_bert_common.sh.
# Extra flags are passed on (e.g. --pre-layernorm --sentence-head nsp).
source "$(dirname "$0")/_bert_common.sh"
exec python -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --master_port "$MASTER_PORT" \
  pretrain_bert.py "${BERT_ARGS[@]}" "$@"
