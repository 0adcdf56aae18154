#!/usr/bin/env bash
# accelerate launch (single or multi node) of the same entry point. Usage:
#   launch/accelerate.sh --nproc N [--nnodes M --node-rank R --master HOST --port P] [--dry-run] -- <train args>
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=1; nnodes=1; node_rank=0; master=127.0.0.1; port=29500; dry=0; module=train.command
accelerate_bin="${ACCELERATE:-$here/.venv/bin/accelerate}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2;;
    --nnodes) nnodes="$2"; shift 2;;
    --node-rank) node_rank="$2"; shift 2;;
    --master) master="$2"; shift 2;;
    --port) port="$2"; shift 2;;
    --dry-run) dry=1; shift;;
    --module) module="$2"; shift 2;;
    --) shift; break;;
    *) echo "accelerate.sh: unknown option $1 (train arguments go after --)" >&2; exit 2;;
  esac
done
cmd=("$accelerate_bin" launch --multi_gpu --num_processes "$((nproc * nnodes))" --num_machines "$nnodes"
     --machine_rank "$node_rank" --main_process_ip "$master" --main_process_port "$port" -m "$module" "$@")
if [[ $dry -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
cd "$here" && exec "${cmd[@]}"
