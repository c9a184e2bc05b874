# Shared settings of the BERT launch scripts (sourced, not run). Environment: GPUS_PER_NODE
# (default 2), MP (model-parallel size, default 1), TRAIN_ITERS, BATCH_SIZE, CHECKPOINT_PATH
# (default: one directory per launch script), MASTER_PORT. One node only; a bad value is one
# `error:` line and exit 2.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$REPO_ROOT/scripts/_check_int.sh"  # after the cd above: not relative to the caller
# One node only: the GPT-2 scripts' multi-node variables would be ignored here without a word.
if [ -n "${HOSTFILE:-}${RDZV_ENDPOINT:-}" ]; then
  echo "error: the BERT scripts run on one node (HOSTFILE and RDZV_ENDPOINT are for the GPT-2 scripts); for several nodes run pretrain_bert.py under torchrun or deepspeed yourself" >&2
  exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
check_int NNODES 1 1 "the BERT scripts run on one node; for several, run pretrain_bert.py under torchrun or deepspeed yourself"
check_int NODE_RANK 0 0 "the BERT scripts run on one node"
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
MASTER_PORT=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('',0)); print(s.getsockname()[1])")}
MP=${MP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-200}
BATCH_SIZE=${BATCH_SIZE:-8}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/$(basename "$0" .sh)_demo}
check_int GPUS_PER_NODE 1 4096 "ranks per node"
check_int MASTER_PORT 1 65535 "a TCP port"
check_int MP 1 4096 "the model-parallel size"
check_int TRAIN_ITERS 1 999999999
check_int BATCH_SIZE 1 999999 "sequences per rank and step"

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
