#!/usr/bin/env bash
# One node, N processes (torchrun --standalone). Usage:
#   launch/single_node.sh --nproc N [--dry-run] [--python PY] [--module MOD] -- <cammsr train args>
# e.g. launch/single_node.sh --nproc 2 -- --data data/ml100k --config configs/ml100k.yaml --run-dir runs/a
# --module runs another entry point with the same launch (default train.command = `cammsr train`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=1; dry=0; python="${PYTHON:-$here/.venv/bin/python}"; module=train.command
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2;;
    --dry-run) dry=1; shift;;
    --python) python="$2"; shift 2;;
    --module) module="$2"; shift 2;;
    --) shift; break;;
    *) echo "single_node.sh: unknown option $1 (train arguments go after --)" >&2; exit 2;;
  esac
done
cmd=("$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc" -m "$module" "$@")
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$here/.torch_extensions}"
if [[ $dry -eq 1 ]]; then printf '%q ' env DS_ACCELERATOR="$DS_ACCELERATOR" "${cmd[@]}"; echo; exit 0; fi
cd "$here" && exec "${cmd[@]}"
