#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous: run this same command on every node (NNODES of them), with
# RDZV_HOST = a host all nodes can reach (usually node 0). torchrun numbers ranks node by node, which is what
# the hierarchical allreduce and the node groups assume (node = LOCAL_WORLD_SIZE consecutive ranks).
# The run dir must be on a filesystem every node sees (DCP writes each rank's shards there; rank 0 commits).
#
#   NNODES=2 RDZV_HOST=node0 bash runs/multinode.sh runs_out/mn 20000
#   DP="--dp ddp --hierarchical" NNODES=4 RDZV_HOST=node0 bash runs/multinode.sh   # DDP through HFReduce-style
# Expert parallel spans the whole job for now: DP="--dp fsdp --ep <world size>" (it must divide the experts).
set -euo pipefail
RUN_DIR=${1:-runs_out/multinode}
STEPS=${2:-20000}
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}"
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts 3 \
    --rdzv-backend c10d --rdzv-endpoint "${RDZV_HOST}:${RDZV_PORT:-29500}" --rdzv-id "${RDZV_ID:-nanoseek}" \
    -m nanoseek.cli pretrain --preset "${PRESET:-small}" --steps "$STEPS" --run-dir "$RUN_DIR" \
    ${DP:---dp fsdp} --bf16 --save-minutes 5 --watchdog 600 --no-progress ${EXTRA:-}
