# Sourced by the bare_gpu scripts after they set bundle, out and runs: the clock (start, deadline = BUDGET_S
# seconds on, elapsed), the log (everything to OUT/session.log), the machine's description, the bundle's wheels on
# PYTHONPATH and the bundle's prepared datasets in data/.
start=$(date +%s); deadline=$((start + ${BUDGET_S:-480}))
elapsed() { echo "+$(( $(date +%s) - start ))s"; }
mkdir -p "$out" "$runs" data
exec > >(tee -a "$out/session.log") 2>&1
echo "start $(date -u)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; lscpu | grep -E "Model name|^CPU\(s\)"
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/bare_gpu_site \
  "$bundle"/whl/*.whl || exit 1
cp "$bundle/wds2idx.py" /tmp/bare_gpu_site/
export PYTHONPATH=/tmp/bare_gpu_site:$PWD PYTHONUNBUFFERED=1
for archive in "$bundle"/data/*.tgz; do
  [[ -d "data/$(basename "$archive" .tgz)" ]] || tar xzf "$archive" -C data || exit 1
done
