#!/usr/bin/env bash
# Automatic restart on one machine (TRANSOM-style): torchrun relaunches a worker that crashed or that the
# watchdog ended (no step finished for --watchdog seconds -> exit 75); the relaunched worker resumes from the
# newest intact checkpoint, so the run ends bitwise equal to one that never failed.
#
#   bash runs/restart.sh [RUN_DIR] [STEPS]
#   NANOSEEK_FAULT_HANG_AT_STEP=50 bash runs/restart.sh    # drill: hang once after step 50
set -euo pipefail
RUN_DIR=${1:-runs_out/restart}
STEPS=${2:-200}
PORT=${PORT:-$((29500 + RANDOM % 1000))}
exec torchrun --nproc-per-node 1 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:${PORT}" \
    -m nanoseek.cli pretrain --preset tiny --steps "${STEPS}" --run-dir "${RUN_DIR}" \
    --save-every 25 --watchdog 60
