#!/usr/bin/env bash
# Fresh machine (Python 3.11 + pip) -> .venv with cammsr installed. Usage: ./setup.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")"
python3.11 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and exactly: any looser request pulls a multi-GB CUDA build on CPU machines.
python -m pip install torch==2.13.0
python -m pip install -e ".[dev]"
if [[ "${1:-}" == "--gpu" ]]; then
    python -m pip install fbgemm-gpu==1.8.0 torchrec==1.8.0
else
    # torchrec's metadata asks for the CUDA fbgemm-gpu; its CPU kernels come from fbgemm-gpu-cpu above.
    python -m pip install --no-deps torchrec==1.8.0
fi
python -c "import torchrec, deepspeed, nvidia.dali, webdataset, transformers; print('cammsr environment ready')"
