#!/usr/bin/env bash
# DeepSpeed launcher: from the first node it starts every rank on every host of a hostfile over
# passwordless SSH (pdsh); with NO_SSH=1 run it on each node yourself, with NODE_RANK set.
#
#   launch/deepspeed.sh [--dry-run] [mixtrain train overrides...]
#   GPUS_PER_NODE=8 RUN_DIR=runs/ds launch/deepspeed.sh model=gpt2_124m                 # one node
#   HOSTFILE=launch/hostfile NNODES=2 GPUS_PER_NODE=8 RUN_ID=exp1 launch/deepspeed.sh model=gpt2_350m
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile NNODES=2 RUN_ID=exp1 launch/deepspeed.sh ...
#
# Environment:
#   HOSTFILE        lines "host slots=N" (see launch/hostfile.example); needed for NNODES > 1
#   NNODES          nodes to use, the first NNODES hosts of the hostfile (default 1)
#   GPUS_PER_NODE   ranks per node (default: every slot / GPU)
#   MASTER_ADDR, MASTER_PORT (default 29500)  rank-0 address; DeepSpeed infers it when unset (pdsh)
#   NO_SSH=1 + NODE_RANK    launch on each node separately instead of over SSH
#   RUN_ID / RUN_DIR        as in torchrun_multinode.sh: one run dir for all nodes and restarts
#   ENGINE          engine group override (default deepspeed)
# The launcher passes RANK/LOCAL_RANK/WORLD_SIZE in the environment; --no_local_rank keeps it from
# appending --local_rank=N, which is not a Hydra override. NCCL_*, PYTHON* and the variables in
# a .deepspeed_env file (cwd or home) are forwarded to remote nodes.
# --dry-run prints the command instead of running it.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
die() { echo "launch/deepspeed.sh: $*" >&2; exit 2; }

nnodes="${NNODES:-1}"
run_id="${RUN_ID:-${SLURM_JOB_ID:-}}"
if (( nnodes > 1 )) || [[ -n "${NO_SSH:-}" ]]; then
  [[ -n "${HOSTFILE:-}" ]] || die "set HOSTFILE (lines 'host slots=N', see launch/hostfile.example) for NNODES=$nnodes"
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist"
  if [[ -z "${RUN_DIR:-}" && -z "$run_id" ]]; then
    die "set RUN_ID (or RUN_DIR) so every node and restart uses one run directory"
  fi
fi
run_dir="${RUN_DIR:-runs/${RUN_NAME:-mixtrain}-${run_id:-$(date +%Y%m%d-%H%M%S)}}"

cmd=(deepspeed)
[[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile="$HOSTFILE")
cmd+=(--num_nodes="$nnodes")
[[ -n "${GPUS_PER_NODE:-}" ]] && cmd+=(--num_gpus="$GPUS_PER_NODE")
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr="$MASTER_ADDR")
cmd+=(--master_port="${MASTER_PORT:-29500}")
if [[ -n "${NO_SSH:-}" ]]; then
  [[ -n "${NODE_RANK:-}" ]] || die "NO_SSH=1 needs NODE_RANK (0..NNODES-1) on each node"
  [[ -n "${MASTER_ADDR:-}" ]] || die "NO_SSH=1 needs MASTER_ADDR (address of node 0)"
  cmd+=(--no_ssh --node_rank="$NODE_RANK")
fi
cmd+=(--no_local_rank --module trainer.cli train "engine=${ENGINE:-deepspeed}" "hydra.run.dir=$run_dir" "$@")
if (( dry )); then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
