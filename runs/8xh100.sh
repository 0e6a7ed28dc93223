#!/usr/bin/env bash
# One node, 8 x H100 (NCCL for the GPUs, gloo beside it for the async-checkpoint collectives): FSDP2 per block,
# routed experts sharded 8-way (expert parallel: E/8 experts per GPU, tokens by all-to-all), bf16 autocast,
# optionally blockwise FP8 (--fp8: Hopper scaled-mm where it takes the shapes, emulation otherwise).
# Restarts up to 3 times on a crash or a hang (watchdog: no step for 10 minutes -> exit 75 -> torchrun restarts
# all ranks from the newest intact sharded checkpoint).
#
#   bash runs/8xh100.sh [RUN_DIR] [STEPS] [PRESET]
#   EXTRA="--fp8" bash runs/8xh100.sh runs_out/v3-16b 20000 v3-16b
set -euo pipefail
RUN_DIR=${1:-runs_out/8xh100}
STEPS=${2:-20000}
PRESET=${3:-small}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec torchrun --nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:${PORT:-29500}" \
    -m nanoseek.cli pretrain --preset "$PRESET" --steps "$STEPS" --run-dir "$RUN_DIR" \
    --dp fsdp --ep 8 --bf16 --batch-size "${BATCH:-8}" --seq-len "${SEQ:-4096}" \
    --save-minutes 5 --watchdog 600 --no-progress ${EXTRA:-}
