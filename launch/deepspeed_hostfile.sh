#!/usr/bin/env bash
# The deepspeed launcher over a hostfile ("host slots=N" lines; passwordless ssh to every host). Usage:
#   launch/deepspeed_hostfile.sh --hostfile HOSTFILE [--master HOST] [--port P] [--dry-run] [--module MOD] -- <train args>
# The launcher sets RANK/WORLD_SIZE/LOCAL_RANK for each process; train/distributed.py reads them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hostfile=""; master=""; port=29500; dry=0; module=train.command
deepspeed_bin="${DEEPSPEED:-$here/.venv/bin/deepspeed}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) hostfile="$2"; shift 2;;
    --master) master="$2"; shift 2;;
    --port) port="$2"; shift 2;;
    --dry-run) dry=1; shift;;
    --module) module="$2"; shift 2;;
    --) shift; break;;
    *) echo "deepspeed_hostfile.sh: unknown option $1 (train arguments go after --)" >&2; exit 2;;
  esac
done
[[ -n "$hostfile" ]] || { echo "deepspeed_hostfile.sh: --hostfile is required" >&2; exit 2; }
[[ -f "$hostfile" ]] || { echo "deepspeed_hostfile.sh: hostfile $hostfile not found" >&2; exit 2; }
master="${master:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
cmd=("$deepspeed_bin" --hostfile "$hostfile" --master_addr "$master" --master_port "$port" --module "$module" "$@")
if [[ $dry -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
cd "$here" && exec "${cmd[@]}"
