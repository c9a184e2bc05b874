# Shared settings of the BERT launch scripts (sourced, not run). Environment: GPUS_PER_NODE
# (default 2), MP (model-parallel size, default 1), TRAIN_ITERS, BATCH_SIZE, CHECKPOINT_PATH
# (default: one directory per launch script), MASTER_PORT.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
MASTER_PORT=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('',0)); print(s.getsockname()[1])")}
MP=${MP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-200}
BATCH_SIZE=${BATCH_SIZE:-8}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/$(basename "$0" .sh)_demo}

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
