#!/usr/bin/env bash
# Throughput of baseline Megatron vs DeepSpeed ZeRO 1/2/3/2+offload at the largest micro batch
# that fits (tools/bench_throughput.py; flags are passed on). Default: the small CPU matrix
# (tiny model on 2 ranks, small model on 4). On GPUs, for example:
#   scripts/bench_throughput.sh --models 124M 345M --ranks 8 --mp 1 2 4 --precisions bf16 --max-batch 64
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/bench_throughput.py "$@"
