#!/usr/bin/env bash
# Run HERE (the package index reachable): everything a bare GPU machine needs for benchmarks/bare_gpu/beauty.sh when
# it has torch with CUDA, transformers and numpy but none of this project's other packages and no network, as the
# lent device machine (../shared/docs/STACK.md). Writes OUT/whl (pure-Python or cp<VERSION> wheels of DeepSpeed and
# what it and the shard reader import, at the versions of this .venv), OUT/wds2idx.py (DALI's one-file index module,
# imported by the shard writer) and OUT/data/<name>.tgz (a prepared dataset with its extracted features).
# --image-encoder also writes OUT/encoders/dinov2-small-bf16 (the default image encoder in bf16, 44 MB: the fp32
# weights would not fit the device tool's carry limit beside the rest) and a Pillow wheel, for the stream-mode
# script (benchmarks/bare_gpu/stream.sh), which decodes with PIL there (the DALI wheel is too large to carry).
#   benchmarks/bare_gpu/bundle.sh [--out .gpu] [--python-version 3.12] [--data data/beauty] [--image-encoder]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$here/.gpu"; pyver=3.12; data="$here/data/beauty"; image_encoder=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2;;
    --python-version) pyver="$2"; shift 2;;
    --data) data="$2"; shift 2;;
    --image-encoder) image_encoder=1; shift;;
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
if (( image_encoder )); then
  # shellcheck disable=SC2046
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    -d "$out/whl" $(pin pillow)
  PYTHONPATH="$here" "$py" -c 'import json, sys, torch
from pathlib import Path
from data_shards.features.dinov2_conversion import DEFAULT_PREPROCESSOR
from data_shards.features.encoders import load_image_encoder
load_image_encoder("default").model.to(torch.bfloat16).save_pretrained(sys.argv[1])
(Path(sys.argv[1]) / "preprocessor_config.json").write_text(json.dumps(DEFAULT_PREPROCESSOR))' \
    "$out/encoders/dinov2-small-bf16"
fi
tar czf "$out/data/$(basename "$data").tgz" -C "$(dirname "$data")" "$(basename "$data")"
du -sh "$out/whl" "$out/data"/*.tgz
echo "carry $out (the device tool's carry limit is 64 MiB) and run there: bash benchmarks/bare_gpu/beauty.sh (or stream.sh for a bundle made with --image-encoder)"
