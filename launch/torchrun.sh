#!/usr/bin/env bash
# Single-node launch: torchrun, one process per GPU (or CPU ranks on gloo).
#
#   launch/torchrun.sh [--dry-run] NPROC [mixtrain train overrides...]
#   launch/torchrun.sh 8 model=gpt2_124m mixture=static mixture.weights_from=runs/proxy
#   RUN_DIR=runs/main launch/torchrun.sh 8 model=gpt2_124m      # a fixed run dir: rerun to resume
#
# Environment: RUN_DIR (default runs/<date-time>), MAX_RESTARTS (torchrun restarts of the whole
# worker group after a failure, default 0; each restart resumes from the latest complete
# checkpoint because the run dir is fixed here and train.resume=auto is the default).
# --dry-run prints the command instead of running it.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
nproc="${1:?usage: launch/torchrun.sh [--dry-run] NPROC [overrides...]}"; shift
# Fixed here, once, so every rank (and every restart) agrees on the run directory.
run_dir="${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}"
# torch 2.13's c10d rendezvous shares one agent TCP store across restarts, and restarted workers
# can read the dead group's addresses from it (gloo/NCCL "connection refused"); a store per round
# avoids that. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 to get torch's default back.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
cmd=(torchrun --standalone --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}"
     -m trainer.cli train "hydra.run.dir=$run_dir" "$@")
if (( dry )); then
  echo "# env: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
