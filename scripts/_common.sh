# Shared settings of the launch scripts (sourced, not run). Every value can be overridden from the
# environment:
#   MODEL=demo|124M|345M|1.5B|4B|8B|20B   model size (demo: tiny, trains on a 2-core CPU in minutes)
#   TRAIN_DATA=demo|webtext|PATH.json      loose-JSON corpus (demo is built on first use)
#   DATA_PATH="PREFIX" or "0.3 A 0.7 B"    preprocessed .bin/.idx data instead of TRAIN_DATA
#   VOCAB_FILE, MERGE_FILE                 GPT-2 vocabulary (default: the demo's)
#   BATCH_SIZE, TRAIN_ITERS, SEQ_LENGTH, LR, CHECKPOINT_PATH, PRECISION=fp32|fp16|bf16
#   GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   (several nodes: run the script on each,
#                            with node 0's MASTER_ADDR and one MASTER_PORT everywhere)
#   RDZV_ENDPOINT=host:port  torchrun scripts: elastic c10d rendezvous instead of a fixed master, with
#                            MIN_NODES (default NNODES) to NNODES nodes and MAX_RESTARTS (default 3)
#   HOSTFILE=path            DeepSpeed scripts: DeepSpeed's "host slots=N" file, started over ssh (PDSH)
#                            on its first NNODES hosts (default: all); NO_SSH=1 starts only this node
#                            (run the script on each, NODE_RANK set)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# GPUs here, and whether the CPU computes bf16 natively (AVX-512 BF16 or AMX: bf16 steps then take
# about 0.4x the fp32 time at the demo's shape; elsewhere bf16 is emulated, so fp32 stays).
read -r HAVE_GPU GPU_COUNT CPU_BF16 < <(python -c "import torch
bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() or getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()
print(int(torch.cuda.is_available()), torch.cuda.device_count(), int(bf16))")
if [ "$HAVE_GPU" = 1 ]; then
  DEFAULT_GPUS=$GPU_COUNT
  DEFAULT_PRECISION=fp16
else
  DEFAULT_GPUS=2  # CPU ranks (gloo)
  if [ "$CPU_BF16" = 1 ]; then DEFAULT_PRECISION=bf16; else DEFAULT_PRECISION=fp32; fi
  # DeepSpeed (its launcher and every rank) then warns once per process that it fell back to CPU.
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-$DEFAULT_GPUS}
NNODES_GIVEN=${NNODES:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR_GIVEN=${MASTER_ADDR:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT_GIVEN=${MASTER_PORT:-}
# A free port here: right for one node only (every node must be given the same MASTER_PORT).
MASTER_PORT=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('',0)); print(s.getsockname()[1])")}
PRECISION=${PRECISION:-$DEFAULT_PRECISION}
MODEL=${MODEL:-demo}

# One line and exit 2 for a launcher variable the launchers cannot use (they would hang or print a
# traceback).
source "$REPO_ROOT/scripts/_check_int.sh"  # after the cd above: not relative to the caller
check_int GPUS_PER_NODE 1 4096 "ranks per node"
check_int NNODES 1 100000
check_int MASTER_PORT 1 65535 "a TCP port"

case "$MODEL" in
  demo) LAYERS=4;  HIDDEN=256;  HEADS=8;  SEQ=128;  DEF_BATCH=8; DEF_ITERS=900; DEF_LR=1e-3
        # About 3 minutes of training on 2 CPU cores in bf16; fp32 on a CPU takes 2.6x as long a step.
        if [ "$HAVE_GPU" = 0 ] && [ "$PRECISION" = fp32 ]; then DEF_ITERS=350; fi ;;
  124M) LAYERS=12; HIDDEN=768;  HEADS=12; SEQ=1024; DEF_BATCH=8; DEF_ITERS=320000; DEF_LR=6e-4 ;;
  345M) LAYERS=24; HIDDEN=1024; HEADS=16; SEQ=1024; DEF_BATCH=8; DEF_ITERS=320000; DEF_LR=1.5e-4 ;;
  1.5B) LAYERS=48; HIDDEN=1600; HEADS=16; SEQ=1024; DEF_BATCH=8; DEF_ITERS=320000; DEF_LR=1.5e-4 ;;
  4B)   LAYERS=64; HIDDEN=2304; HEADS=16; SEQ=1024; DEF_BATCH=8; DEF_ITERS=320000; DEF_LR=1.5e-4 ;;
  8B)   LAYERS=72; HIDDEN=3072; HEADS=24; SEQ=1024; DEF_BATCH=8; DEF_ITERS=320000; DEF_LR=1.5e-4 ;;
  20B)  LAYERS=111; HIDDEN=3808; HEADS=32; SEQ=1024; DEF_BATCH=4; DEF_ITERS=320000; DEF_LR=1.5e-4 ;;
  *) echo "error: MODEL=$MODEL is not one of demo 124M 345M 1.5B 4B 8B 20B" >&2; exit 2 ;;
esac
SEQ_LENGTH=${SEQ_LENGTH:-$SEQ}
BATCH_SIZE=${BATCH_SIZE:-$DEF_BATCH}
TRAIN_ITERS=${TRAIN_ITERS:-$DEF_ITERS}
LR=${LR:-$DEF_LR}
check_int TRAIN_ITERS 1 999999999
check_int BATCH_SIZE 1 999999 "sequences per rank and step"
check_int SEQ_LENGTH 1 999999 "tokens per sequence"
VOCAB_FILE=${VOCAB_FILE:-data/demo/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-data/demo/gpt2-merges.txt}
# One checkpoint directory per launch script and model: a relaunch resumes its own run.
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/$(basename "$0" .sh)_${MODEL}}

if [ -n "${DATA_PATH:-}" ]; then
  # shellcheck disable=SC2206
  DATA_ARGS=(--data-path $DATA_PATH)
else
  DATA_ARGS=(--train-data "${TRAIN_DATA:-demo}")
fi

case "$PRECISION" in
  fp32) PRECISION_ARGS=() ;;
  fp16) [ "$HAVE_GPU" = 1 ] || { echo "error: PRECISION=fp16 needs a GPU (DeepSpeed's fp16 is GPU-only, and a CPU has no fp16 matmuls: a demo step took 8 s); use PRECISION=bf16 or fp32 here" >&2; exit 2; }
        PRECISION_ARGS=(--fp16) ;;
  bf16) PRECISION_ARGS=(--bf16) ;;
  *) echo "error: PRECISION=$PRECISION is not one of fp32 fp16 bf16" >&2; exit 2 ;;
esac

if [ "$MODEL" = demo ]; then
  EVAL_ARGS=(--log-interval 50 --eval-interval 150 --eval-iters 5 --save-interval 300)
else
  EVAL_ARGS=(--log-interval 100 --eval-interval 1000 --eval-iters 10 --save-interval 5000 --checkpoint-activations)
fi

GPT2_ARGS=(
  --num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
  --batch-size "$BATCH_SIZE" --train-iters "$TRAIN_ITERS" --lr "$LR" --lr-decay-style cosine
  --warmup 0.01 --weight-decay 1e-2 --clip-grad 1.0 --min-lr 1e-5
  "${DATA_ARGS[@]}" --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" --split 949,50,1
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
  "${EVAL_ARGS[@]}" "${PRECISION_ARGS[@]}"
)

# Build the demo corpus once, before the ranks start (they would otherwise wait on its lock).
if [ "${TRAIN_DATA:-demo}" = demo ] || [[ "$VOCAB_FILE" == data/demo/* ]]; then
  python tools/build_demo_corpus.py --output-dir data/demo >/dev/null
fi

# The launchers. A script calls the one it uses; it checks that launcher's variables (one line and
# exit 2 for a value that would hang it or end in a traceback) and sets the command array.
# torchrun through megatron.torchrun: a failed rank ends the run with one line and its exit code,
# not torchrun's ChildFailedError traceback and exit 1.
torchrun_launcher() {  # sets TORCHRUN
  if [ -n "${RDZV_ENDPOINT:-}" ]; then
    MIN_NODES=${MIN_NODES:-$NNODES}
    MAX_RESTARTS=${MAX_RESTARTS:-3}
    check_int MIN_NODES 1 "$NNODES" "the fewest nodes the elastic run continues with, at most NNODES=$NNODES"
    check_int MAX_RESTARTS 0 100000
    if [[ "$RDZV_ENDPOINT" == \[* ]]; then  # [IPv6]:port
      [[ "$RDZV_ENDPOINT" =~ ^\[[^]]+\](:(.*))?$ ]] || {
        echo "error: RDZV_ENDPOINT=$RDZV_ENDPOINT is not [address]:port" >&2; exit 2; }
      RDZV_PORT=${BASH_REMATCH[2]:-29400}
    elif [[ "$RDZV_ENDPOINT" == *:*:* ]]; then
      echo "error: RDZV_ENDPOINT=$RDZV_ENDPOINT has more than one ':'; write an IPv6 address in brackets, [address]:port" >&2
      exit 2
    elif [[ "$RDZV_ENDPOINT" == *:* ]]; then
      RDZV_PORT=${RDZV_ENDPOINT##*:}
    fi
    [ -z "${RDZV_PORT:-}" ] || check_int RDZV_PORT 1 65535 "the port of RDZV_ENDPOINT=$RDZV_ENDPOINT"
    # torch 2.13's c10d rendezvous shares one TCP store across rounds and hangs when a node joins a
    # running job; a store per round does not (docs/training.md, "An elastic run").
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    TORCHRUN=(python -m megatron.torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$MIN_NODES:$NNODES"
              --max-restarts "$MAX_RESTARTS" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
              --rdzv-id "${RDZV_ID:-$(basename "$0" .sh)_${MODEL}}")
    return
  fi
  check_int NODE_RANK 0 $((NNODES - 1)) "this node's number, counted from 0, below NNODES=$NNODES"
  if [ "$NNODES" -gt 1 ] && { [ -z "$MASTER_ADDR_GIVEN" ] || [ -z "$MASTER_PORT_GIVEN" ]; }; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR (node 0's host name) and MASTER_PORT (a free port there), the same on every node" >&2
    exit 2
  fi
  TORCHRUN=(python -m megatron.torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
}

# The hosts of DeepSpeed's hostfile ("host slots=N" lines; comments, blank lines and CRLF allowed).
hostfile_hosts() {
  [ -e "$HOSTFILE" ] || { echo "error: HOSTFILE $HOSTFILE does not exist (one 'host slots=N' line per node)" >&2; exit 2; }
  [ -f "$HOSTFILE" ] || { echo "error: HOSTFILE $HOSTFILE is not a file (one 'host slots=N' line per node)" >&2; exit 2; }
  local line host seen=" "
  HOSTS=0
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    line=${line//$'\r'/}
    [[ "$line" =~ ^[[:space:]]*$ ]] && continue
    if ! [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=0*[1-9][0-9]*[[:space:]]*$ ]]; then
      echo "error: HOSTFILE $HOSTFILE has a line that is not 'host slots=N' (N at least 1): '$line'" >&2
      exit 2
    fi
    host=${BASH_REMATCH[1]}
    if [[ "$seen" == *" $host "* ]]; then
      echo "error: HOSTFILE $HOSTFILE lists $host twice; one line per node" >&2
      exit 2
    fi
    seen+="$host "
    HOSTS=$((HOSTS + 1))
  done < "$HOSTFILE"
  [ "$HOSTS" -gt 0 ] || { echo "error: HOSTFILE $HOSTFILE lists no host (one 'host slots=N' line per node)" >&2; exit 2; }
}

deepspeed_launcher() {  # sets DEEPSPEED
  case "${NO_SSH:-0}" in
    ""|0|1) ;;
    *) echo "error: NO_SSH=$NO_SSH must be 1 (start only this node) or 0 (start every node over ssh)" >&2; exit 2 ;;
  esac
  if [ -z "${HOSTFILE:-}" ]; then
    if [ "$NNODES" -gt 1 ]; then
      echo "error: NNODES=$NNODES: the DeepSpeed scripts start several nodes from HOSTFILE (DeepSpeed's 'host slots=N' file); set it" >&2
      exit 2
    fi
    check_int NODE_RANK 0 0 "this node's number: 0 on one node (several nodes take HOSTFILE)"
    DEEPSPEED=(deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
    return
  fi
  hostfile_hosts
  NNODES=${NNODES_GIVEN:-$HOSTS}  # every host of the file unless NNODES says fewer
  check_int NNODES 1 "$HOSTS" "the nodes to use, at most the $HOSTS hosts of HOSTFILE $HOSTFILE"
  DEEPSPEED=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE")
  # Without ssh every node must be told node 0's address; with it DeepSpeed finds the first host.
  if [ "${NO_SSH:-0}" = 1 ]; then
    check_int NODE_RANK 0 $((NNODES - 1)) "this node's number, counted from 0, below NNODES=$NNODES"
    if [ "$NNODES" -gt 1 ] && [ -z "$MASTER_ADDR_GIVEN" ]; then
      echo "error: NO_SSH=1 with NNODES=$NNODES needs MASTER_ADDR (node 0's host name), the same on every node" >&2
      exit 2
    fi
    DEEPSPEED+=(--no_ssh --node_rank "$NODE_RANK")
  fi
  if [ -n "$MASTER_ADDR_GIVEN" ]; then DEEPSPEED+=(--master_addr "$MASTER_ADDR"); fi
  if [ -n "$MASTER_PORT_GIVEN" ]; then DEEPSPEED+=(--master_port "$MASTER_PORT"); fi  # else DeepSpeed's 29500
}

# The demo ends with what the model learned: continuations of two fixed docstring openings, drawn
# with top-k 40 at temperature 0.8 from a fixed seed (the same checkpoint gives the same text; a model
# this small repeats itself under greedy decoding). Rank 0's node only; DEMO_SAMPLES=0 skips them.
# Called after training by the GPT-2 scripts.
show_demo_samples() {
  [ "$MODEL" = demo ] && [ "$NODE_RANK" = 0 ] && [ "${DEMO_SAMPLES:-1}" = 1 ] || return 0
  local prompts samples sampling="--top_k 40 --temperature 0.8 --seed 1234"
  # Training succeeded whatever happens here: a failure is a note, and the script's status stays 0.
  if ! prompts=$(mktemp 2>/dev/null) || ! samples=$(mktemp -u 2>/dev/null) \
     || ! printf '%s\n' "Return the number of" "This module provides" > "$prompts"; then
    echo "note: no demo samples: cannot write a temporary file in ${TMPDIR:-/tmp} (set TMPDIR to a writable directory)" >&2
    rm -f "${prompts:-}"
    return 0
  fi
  # shellcheck disable=SC2086
  if python generate_samples.py --load "$CHECKPOINT_PATH" --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
       --sample-input-file "$prompts" --sample-output-file "$samples" $sampling --out-seq-length 48 >/dev/null; then
    echo "samples from $CHECKPOINT_PATH ($sampling):"
    python -c 'import json, re, sys
for number, line in enumerate(open(sys.argv[1]), 1):
    sample = json.loads(line)
    text = re.sub(r"\n\s*\n+", "\n", (sample["prompt"] + sample["text"]).strip())
    print(f"  {number}. " + "\n     ".join(part.rstrip() for part in text.splitlines()))' "$samples"
  else
    echo "note: no demo samples: generate_samples.py could not sample from $CHECKPOINT_PATH (its error is above); training itself finished" >&2
  fi
  rm -f "$prompts" "$samples"
}
