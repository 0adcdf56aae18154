#!/usr/bin/env bash
# The deepspeed launcher over a hostfile ("host slots=N" lines; passwordless ssh to every host). Usage:
#   launch/deepspeed_hostfile.sh --hostfile HOSTFILE [--master HOST] [--port P] [--dry-run] [--module MOD] -- <train args>
#   launch/deepspeed_hostfile.sh --nproc N [--port P] [--dry-run] -- <train args>      (this node only, no ssh)
# The launcher sets RANK/WORLD_SIZE/LOCAL_RANK for each process; train/distributed.py reads them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hostfile=""; master=""; port=29500; dry=0; module=train.command; nproc=""
deepspeed_bin="${DEEPSPEED:-$here/.venv/bin/deepspeed}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) hostfile="$2"; shift 2;;
    --nproc) nproc="$2"; shift 2;;
    --master) master="$2"; shift 2;;
    --port) port="$2"; shift 2;;
    --dry-run) dry=1; shift;;
    --module) module="$2"; shift 2;;
    --) shift; break;;
    *) echo "deepspeed_hostfile.sh: unknown option $1 (train arguments go after --)" >&2; exit 2;;
  esac
done
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$here/.venv/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$here/.torch_extensions}"
if [[ -n "$nproc" ]]; then
  cmd=("$deepspeed_bin" --num_gpus "$nproc" --master_port "$port" --no_local_rank --module "$module" "$@")
else
  [[ -n "$hostfile" ]] || { echo "deepspeed_hostfile.sh: --hostfile or --nproc is required" >&2; exit 2; }
  [[ -f "$hostfile" ]] || { echo "deepspeed_hostfile.sh: hostfile $hostfile not found" >&2; exit 2; }
  master="${master:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
  cmd=("$deepspeed_bin" --hostfile "$hostfile" --master_addr "$master" --master_port "$port" --no_local_rank
       --module "$module" "$@")
fi
if [[ $dry -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
cd "$here" && exec "${cmd[@]}"
