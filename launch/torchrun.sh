#!/usr/bin/env bash
# Single-node launch: torchrun with one process per GPU (or CPU ranks with gloo).
#   launch/torchrun.sh [--dry-run] NPROC [mixtrain train overrides...]
#   launch/torchrun.sh 8 model=gpt2_124m mixture=static mixture.weights_from=runs/proxy
# A fixed hydra.run.dir is passed so every rank agrees on the run directory without a broadcast.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
nproc="${1:?usage: launch/torchrun.sh [--dry-run] NPROC [overrides...]}"; shift
run_dir="${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}"
cmd=(torchrun --standalone --nproc_per_node="$nproc" -m trainer.cli train "hydra.run.dir=$run_dir" "$@")
if (( dry )); then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
