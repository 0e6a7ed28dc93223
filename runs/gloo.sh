#!/usr/bin/env bash
# Multi-process on one CPU machine (gloo): the distributed code paths, small. Data parallel over 2 processes with
# the global batch of a 1-process run at --batch-size 4 (the batch size is per process), FSDP2 + expert parallel,
# restarts on failure, and the hierarchical allreduce on 4 processes simulated as 2 nodes x 2.
#
#   bash runs/gloo.sh [RUN_DIR] [STEPS]
#   MODE=fsdp-ep bash runs/gloo.sh          # FSDP2 over blocks + experts sharded over the 2 processes
#   MODE=hier bash runs/gloo.sh             # DDP with the two-level allreduce, 4 processes as 2 nodes x 2
set -euo pipefail
RUN_DIR=${1:-runs_out/gloo}
STEPS=${2:-200}
MODE=${MODE:-ddp}
PORT=${PORT:-$((29500 + RANDOM % 1000))}
case "$MODE" in
  ddp)     NPROC=2; PAR=(--dp ddp) ;;
  fsdp-ep) NPROC=2; PAR=(--dp fsdp --ep 2) ;;
  hier)    NPROC=4; PAR=(--dp ddp --hierarchical --node-size 2) ;;
  *) echo "MODE must be ddp, fsdp-ep or hier" >&2; exit 2 ;;
esac
exec torchrun --nproc-per-node "$NPROC" --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:${PORT}" \
    -m nanoseek.cli pretrain --preset tiny --steps "$STEPS" --run-dir "$RUN_DIR" --batch-size $((8 / NPROC)) \
    --save-every 25 --watchdog 120 --threads 1 "${PAR[@]}"
