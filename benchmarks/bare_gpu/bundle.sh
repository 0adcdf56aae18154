#!/usr/bin/env bash
# Run HERE (the package index reachable): everything a bare GPU machine needs for benchmarks/bare_gpu/beauty.sh when
# it has torch with CUDA, transformers and numpy but none of this project's other packages and no network, as the
# lent device machine (../shared/docs/STACK.md). Writes OUT/whl (pure-Python or cp<VERSION> wheels of DeepSpeed and
# what it and the shard reader import, at the versions of this .venv), OUT/wds2idx.py (DALI's one-file index module,
# imported by the shard writer) and OUT/data/<name>.tgz (a prepared dataset with its extracted features).
#   benchmarks/bare_gpu/bundle.sh [--out .gpu] [--python-version 3.12] [--data data/beauty]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$here/.gpu"; pyver=3.12; data="$here/data/beauty"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2;;
    --python-version) pyver="$2"; shift 2;;
    --data) data="$2"; shift 2;;
    *) echo "bundle.sh: unknown option $1" >&2; exit 2;;
  esac
done
py="$here/.venv/bin/python"
[[ -f "$data/manifest.json" && -d "$data/features" ]] || {
  echo "bundle.sh: $data is not a prepared dataset with features (cammsr prepare, then cammsr extract)" >&2; exit 2; }
pin() { "$py" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1:]))' "$@"; }
mkdir -p "$out/whl" "$out/data"
# deepspeed is published as an sdist only; its wheel is pure Python (ops are compiled at run time, if at all)
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out/whl" "$(pin deepspeed)"
# shellcheck disable=SC2046  # one argument per requirement
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp -d "$out/whl" \
  $(pin pydantic pydantic_core annotated-types typing-inspection hjson webdataset braceexpand)
cp "$("$py" -c 'import wds2idx; print(wds2idx.__file__)')" "$out/"
tar czf "$out/data/$(basename "$data").tgz" -C "$(dirname "$data")" "$(basename "$data")"
du -sh "$out/whl" "$out/data"/*.tgz
echo "carry $out (the device tool's carry limit is 64 MiB) and run: bash benchmarks/bare_gpu/beauty.sh"
