#!/usr/bin/env bash
# BERT pretraining through DeepSpeed (ZeRO stage 1 by default) on 2 ranks (CPU: gloo).
# With no arguments: the same small encoder on the demo corpus as scripts/pretrain_bert.sh.
# DS_CONFIG=path selects another DeepSpeed config. Extra flags are passed on.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
MASTER_PORT=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('',0)); print(s.getsockname()[1])")}
MP=${MP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-200}
BATCH_SIZE=${BATCH_SIZE:-8}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/ds_bert_demo}

# Build the demo corpus and WordPiece vocabulary once, before the ranks start.
python -c "from megatron.data.bert_dataset import ensure_demo_wordpiece; ensure_demo_wordpiece('data/demo')"

BERT_ARGS=(
  --num-layers 2 --hidden-size 128 --num-attention-heads 4
  --seq-length 64 --max-position-embeddings 64 --model-parallel-size "$MP"
  --batch-size "$BATCH_SIZE" --train-iters "$TRAIN_ITERS" --lr 2e-3 --lr-decay-style cosine
  --warmup 0.05 --weight-decay 1e-2 --clip-grad 1.0 --min-lr 1e-5
  --train-data demo --tokenizer-type BertWordPieceLowerCase --vocab-file data/demo/bert-uncased-vocab.txt
  --make-vocab-size-divisible-by 40 --split 949,50,1 --num-workers 1
  --mask-prob 0.15 --random-replace-prob 0.1 --unmask-replace-prob 0.1 --sentence-head sop
  --log-interval 20 --eval-interval 100 --eval-iters 5 --save-interval 100
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
)
DS_CONFIG=${DS_CONFIG:-scripts/ds_zero1_config.json}
[ -f "$DS_CONFIG" ] || { echo "error: DeepSpeed config $DS_CONFIG does not exist" >&2; exit 2; }
exec deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" pretrain_bert.py \
  "${BERT_ARGS[@]}" --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
