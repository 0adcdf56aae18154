#!/usr/bin/env bash
# Run THERE, on a bare GPU machine, from the repository root with the bundle of benchmarks/bare_gpu/bundle.sh at
# BUNDLE (default .gpu): the Beauty step profile (ops, wall ms, GPU-busy share), SASRec vs CAMMSR epoch timings,
# then CAMMSR trained to its early stop, all with configs/beauty.yaml and data.build_features=false (the features
# travelled in the bundle, so no encoder is needed). Everything is logged to OUT/session.log (OUT: $OUT, as the
# device tool sets it, else runs/bare_gpu) and the run directories, less checkpoints, to OUT/runs.tgz. The
# training stops at BUDGET_S seconds (default 480) after the start, early stop or not.
#   BUDGET_S=480 bash benchmarks/bare_gpu/beauty.sh [BUNDLE]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bundle="${1:-.gpu}"; out="${OUT:-runs/bare_gpu}"; runs=runs/bare_gpu
# shellcheck source=session.sh
. benchmarks/bare_gpu/session.sh
python3 -c "import sys, torch, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__,
'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" || exit 1
collect() { tar czf "$out/runs.tgz" --exclude=checkpoints -C "$runs" . ; }
trap collect EXIT
quiet() { tr "\r" "\n" | grep -v -E "Warning|warn\(|USDT|(it|step|chunk|shard)/s[],]|^\s*$"; }
beauty="--data data/beauty --config configs/beauty.yaml data.build_features=false"
for model in cammsr sasrec; do
  echo "== step_ops $model $(elapsed)"
  timeout 90 python3 -m benchmarks.step_ops $beauty --timed-steps 40 "model.name=$model" 2>&1 | quiet
done
echo "== throughput $(elapsed)"
timeout 150 python3 -m benchmarks.throughput_benchmark --dataset beauty --systems sasrec,cammsr --epochs 3 \
  --out "$runs/throughput" data.build_features=false 2>&1 | quiet
remaining=$((deadline - $(date +%s)))
if (( remaining < 30 )); then echo "== no time left for CAMMSR to early stop $(elapsed)"; exit 0; fi
echo "== CAMMSR to early stop, at most ${remaining}s $(elapsed)"
timeout -s INT "$remaining" python3 -m launch.cli train $beauty --run-dir "$runs/cammsr" > "$runs/cammsr.log" 2>&1
echo "train exit $? $(elapsed)"
quiet < "$runs/cammsr.log" | grep -E "^epoch [0-9]+: loss|valid ndcg|^metrics" | tail -6
