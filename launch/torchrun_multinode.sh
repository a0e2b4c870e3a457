#!/usr/bin/env bash
# Multi-node launch with torchrun: run this same command on every node (same working directory on
# a shared filesystem, same environment except NODE_RANK).
#
#   launch/torchrun_multinode.sh [--dry-run] [mixtrain train overrides...]
#
#   # static: node 0 hosts the store at MASTER_ADDR:MASTER_PORT; NODE_RANK=0..NNODES-1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 RUN_ID=exp1 NPROC_PER_NODE=8 launch/torchrun_multinode.sh model=gpt2_124m
#   # c10d rendezvous (elastic: ranks assigned at rendezvous, NODE_RANK not needed, restarts work)
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29500 RUN_ID=exp1 MAX_RESTARTS=3 launch/torchrun_multinode.sh model=gpt2_124m
#
# Environment:
#   NNODES          nodes (c10d also takes MIN:MAX)                                  required
#   NPROC_PER_NODE  processes per node (a number, gpu or auto)                        default auto
#   RDZV_ENDPOINT   host:port of the c10d rendezvous store; selects c10d mode
#   NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500)                               static mode
#   RUN_ID          job id shared by all nodes: the rendezvous id and the run dir name
#   RUN_DIR         run directory (default runs/${RUN_NAME:-mixtrain}-$RUN_ID); every node and
#                   every restart must name the same one, so it is never derived from a clock here
#   MAX_RESTARTS    worker-group restarts after a failure (default 3 with c10d, 0 static: restarts
#                   need c10d); each resumes from the latest complete checkpoint (train.resume=auto)
# --dry-run prints the command instead of running it.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
die() { echo "launch/torchrun_multinode.sh: $*" >&2; exit 2; }

nnodes="${NNODES:?set NNODES (number of nodes)}"
nproc="${NPROC_PER_NODE:-auto}"
run_id="${RUN_ID:-${SLURM_JOB_ID:-}}"
if [[ -z "${RUN_DIR:-}" && -z "$run_id" ]]; then
  die "set RUN_ID (or RUN_DIR) to the same value on every node: it names the shared run directory"
fi
run_dir="${RUN_DIR:-runs/${RUN_NAME:-mixtrain}-$run_id}"

# torch 2.13's c10d rendezvous shares one agent TCP store across restarts, and restarted workers
# can read the dead group's addresses from it (gloo/NCCL "connection refused"); a store per round
# avoids that. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 to get torch's default back.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
cmd=(torchrun --nnodes="$nnodes" --nproc-per-node="$nproc")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${run_id:-$run_dir}"
        --max-restarts="${MAX_RESTARTS:-3}")
else
  [[ -n "${NODE_RANK:-}" ]] || die "set NODE_RANK (0..NNODES-1), or RDZV_ENDPOINT=host:port for c10d rendezvous"
  [[ -n "${MASTER_ADDR:-}" ]] || die "set MASTER_ADDR (address of node 0), or RDZV_ENDPOINT=host:port for c10d rendezvous"
  if (( ${MAX_RESTARTS:-0} > 0 )); then
    echo "launch/torchrun_multinode.sh: warning: MAX_RESTARTS with the static rendezvous failed in tests" \
         "(restarted ranks could not reconnect); use RDZV_ENDPOINT=host:port (c10d) for restarts" >&2
  fi
  cmd+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}"
        --max-restarts="${MAX_RESTARTS:-0}")
fi
cmd+=(-m trainer.cli train "hydra.run.dir=$run_dir" "$@")
if (( dry )); then
  echo "# env: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
