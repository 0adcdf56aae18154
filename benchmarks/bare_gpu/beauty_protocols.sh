#!/usr/bin/env bash
# Run THERE, on a bare GPU machine, from the repository root with the bundle of benchmarks/bare_gpu/bundle.sh at
# BUNDLE (default .gpu): Amazon Beauty trained to its early stop in both training protocols, CAMMSR (ID + text) and
# SASRec, four runs side by side on the one GPU (each is bound by the host's dispatch, not by the GPU):
#   - configs/beauty_paper.yaml: the paper's protocol (RecBole's one sample per prefix);
#   - configs/beauty.yaml: ours (every prefix of a window in one causal pass).
# Each finished run becomes a result record (benchmarks/run_record.py) in OUT/results; the log is OUT/session.log,
# the run directories less checkpoints OUT/runs.tgz. Runs still training at BUDGET_S seconds (default 480) after
# the start are stopped and recorded as not finished. Timings of runs sharing a GPU are not benchmark numbers.
#   BUDGET_S=480 bash benchmarks/bare_gpu/beauty_protocols.sh [BUNDLE]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bundle="${1:-.gpu}"; out="${OUT:-runs/bare_gpu}"; runs=runs/beauty
# shellcheck source=session.sh
. benchmarks/bare_gpu/session.sh
export OMP_NUM_THREADS=3
mkdir -p "$out/results"
collect() { tar czf "$out/runs.tgz" --exclude=checkpoints -C "$runs" . ; }
trap collect EXIT
declare -A config=([cammsr_paper]=configs/beauty_paper.yaml [sasrec_paper]=configs/beauty_paper.yaml
                   [cammsr]=configs/beauty.yaml [sasrec]=configs/beauty.yaml)
arguments_of() {
  local model=cammsr; [[ $1 == sasrec* ]] && model=sasrec
  echo "--data data/beauty --config ${config[$1]} --run-dir $runs/$1 data.build_features=false model.name=$model"
}
pids=()
for name in cammsr_paper sasrec_paper cammsr sasrec; do
  # shellcheck disable=SC2046  # one word per argument
  timeout -s INT $((deadline - $(date +%s))) python3 -m launch.cli train $(arguments_of "$name") \
    > "$runs/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "trainings ended $(elapsed)"
declare -A claim=([cammsr_paper]="CAMMSR w/o V (ID + text + categories), the paper's prefix protocol"
                  [sasrec_paper]="SASRec, the paper's prefix protocol"
                  [cammsr]="CAMMSR w/o V (ID + text + categories), all-positions protocol"
                  [sasrec]="SASRec, all-positions protocol")
declare -A paper=([cammsr_paper]="paper Table III, CAMMSR with images=0.0517" [cammsr]="paper Table III, CAMMSR with images=0.0517"
                  [sasrec_paper]="paper Table III, SASRec=0.0412" [sasrec]="paper Table III, SASRec=0.0412")
for name in cammsr_paper sasrec_paper cammsr sasrec; do
  grep -E "^epoch [0-9]+: loss|valid ndcg|^test at" "$runs/$name.log" | tail -3 | sed "s/^/$name: /"
  python3 -m benchmarks.run_record "$runs/$name" --id "beauty_gpu_$name" --area "Accuracy on Amazon Beauty" \
    --claim "${claim[$name]}" --reference "${paper[$name]}" --command "cammsr train $(arguments_of "$name")" \
    --results-dir "$out/results" || echo "$name: not recorded (not finished)"
done
echo "end $(elapsed)"
