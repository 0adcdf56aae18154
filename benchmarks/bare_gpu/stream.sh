#!/usr/bin/env bash
# Run THERE, on a bare GPU machine, from the repository root with the bundle of
# `benchmarks/bare_gpu/bundle.sh --data data/quickstart --image-encoder` at BUNDLE (default .gpu): the feature modes
# on the quickstart data in bf16 with ZeRO 2 (benchmarks.stream_benchmark: cached, stream with frozen encoders, and
# the image encoder trained as top layers, LoRA or a side adapter: s/step, targets/s, images/s, peak GPU memory),
# records benchmarks/results/stream_quickstart_gpu*.json, copied to OUT.
# What differs from the CPU benchmark, because of what can be carried there: images are decoded by PIL (the DALI
# wheel is too large to carry), the ID table is the plain-torch one (so is fbgemm's), the image encoder is the
# default DINOv2-small in bf16, and the text modality is off (the text encoder would not fit the carry limit
# beside it; images are the heavy part of a step). Logs go to OUT/session.log (OUT: $OUT, else runs/bare_gpu).
#   BUDGET_S=420 bash benchmarks/bare_gpu/stream.sh [BUNDLE]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bundle="${1:-.gpu}"; out="${OUT:-runs/bare_gpu}"; runs=runs/bare_gpu
# shellcheck source=session.sh
. benchmarks/bare_gpu/session.sh
python3 -c "import sys, torch, deepspeed, PIL; print('python', sys.version.split()[0], 'torch', torch.__version__,
'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" || exit 1
quiet() { tr "\r" "\n" | grep -v -E "Warning|warn\(|USDT|(it|step|chunk|shard|item)/s[],]|^\s*$"; }
echo "== stream benchmark $(elapsed)"
timeout $((deadline - $(date +%s))) python3 -m benchmarks.stream_benchmark --data data/quickstart \
  --config configs/quickstart.yaml --steps 20 --modes cached,stream,top_layers,lora,side_adapter --run-dir "$runs/stream" \
  --record stream_quickstart_gpu train.num_negatives=256 train.precision=bf16 train.zero_stage=2 \
  embedding.backend=torch features.image_decoder=pil "data.image_encoder=$bundle/encoders/dinov2-small-bf16" \
  "model.modalities=[id,image]" "model.mscl_pairs=[[id,image]]" 2>&1 | quiet
echo "exit ${PIPESTATUS[0]} $(elapsed)"
cp benchmarks/results/stream_quickstart_gpu*.json "$out/" 2>/dev/null || echo "no record written"
