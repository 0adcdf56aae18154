#!/usr/bin/env bash
# Several nodes with a torchrun c10d rendezvous; run the same command on every node. Usage:
#   launch/multi_node.sh --nnodes M --nproc N --rdzv HOST:PORT [--node-rank R] [--job-id ID] [--dry-run]
#                        [--python PY] [--module MOD] -- <cammsr train args>
# HOST:PORT is reachable from every node (e.g. node 0). Two nodes on one machine (a local simulation):
#   launch/multi_node.sh --nnodes 2 --nproc 1 --rdzv 127.0.0.1:29400 --node-rank 0 -- ... &
#   launch/multi_node.sh --nnodes 2 --nproc 1 --rdzv 127.0.0.1:29400 --node-rank 1 -- ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nnodes=""; nproc=1; rdzv=""; node_rank=""; job_id="cammsr"; dry=0
python="${PYTHON:-$here/.venv/bin/python}"; module=train.command
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes="$2"; shift 2;;
    --nproc) nproc="$2"; shift 2;;
    --rdzv) rdzv="$2"; shift 2;;
    --node-rank) node_rank="$2"; shift 2;;
    --job-id) job_id="$2"; shift 2;;
    --dry-run) dry=1; shift;;
    --python) python="$2"; shift 2;;
    --module) module="$2"; shift 2;;
    --) shift; break;;
    *) echo "multi_node.sh: unknown option $1 (train arguments go after --)" >&2; exit 2;;
  esac
done
[[ -n "$nnodes" && -n "$rdzv" ]] || { echo "multi_node.sh: --nnodes and --rdzv HOST:PORT are required" >&2; exit 2; }
cmd=("$python" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d
     --rdzv_endpoint "$rdzv" --rdzv_id "$job_id")
[[ -n "$node_rank" ]] && cmd+=(--node_rank "$node_rank")
cmd+=(-m "$module" "$@")
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$here/.torch_extensions}"
if [[ $dry -eq 1 ]]; then printf '%q ' env DS_ACCELERATOR="$DS_ACCELERATOR" "${cmd[@]}"; echo; exit 0; fi
cd "$here" && exec "${cmd[@]}"
