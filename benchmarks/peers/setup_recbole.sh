#!/usr/bin/env bash
# Creates the RecBole 1.2.1 peer venv (its own venv: RecBole is NEVER a dependency of the cammsr project).
# Idempotent: re-running only installs what is missing or at the wrong version, then prints what is installed.
#
#   benchmarks/peers/setup_recbole.sh                 # venv at <repo>/.peer-venv/recbole
#   PEER_VENV=/some/dir benchmarks/peers/setup_recbole.sh
#
# Pins (see /work/shared/docs/STACK.md, "RecBole 1.2.1 as the peer"):
#   torch 2.13.0 CPU build (never a CUDA torch: the CPU wheel comes from the local find-links / the CPU index),
#   numpy 1.26 (RecBole uses np.float_ etc., gone in numpy 2), pandas/scipy/scikit-learn releases built for it,
#   then setuptools<70 (RecBole's quick_start imports ray, which needs pkg_resources).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEER_VENV:-$REPO_ROOT/.peer-venv/recbole}"
PYTHON="${PYTHON:-python3.11}"

PINS=(torch==2.13.0 recbole==1.2.1 numpy==1.26.4 pandas==2.2.3 scipy==1.13.1 scikit-learn==1.5.2)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup_recbole] creating venv $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
else
  echo "[setup_recbole] venv exists: $VENV"
fi
PY="$VENV/bin/python"

satisfied() {  # all pins already installed at exactly these versions, torch a CPU build, setuptools < 70?
  "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        ok = False; continue
    if have.split("+")[0] != want:
        ok = False
try:
    if int(version("setuptools").split(".")[0]) >= 70:
        ok = False
    tv = version("torch")
    if "+" in tv and not tv.endswith("+cpu"):
        ok = False
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
}

if satisfied "${PINS[@]}"; then
  echo "[setup_recbole] all pins already satisfied; nothing to install"
else
  echo "[setup_recbole] installing: ${PINS[*]}"
  # torch first and alone (the 2.13.0+cpu wheel from the local find-links), so that nothing later can swap it.
  "$PY" -m pip install --quiet --prefer-binary "torch==2.13.0"
  "$PY" -m pip install --quiet --prefer-binary "${PINS[@]}"
  echo "[setup_recbole] installing: setuptools<70"
  # pip warns that torch 2.13 wants setuptools>=77: harmless (torch does not need it at run time; ray needs
  # pkg_resources, which setuptools>=70 dropped).
  "$PY" -m pip install --quiet "setuptools<70"
  satisfied "${PINS[@]}" || { echo "[setup_recbole] ERROR: pins not satisfied after install" >&2; exit 1; }
fi

echo "[setup_recbole] installed in $VENV:"
"$PY" - <<'PYEOF'
from importlib.metadata import version
for n in ["torch", "recbole", "numpy", "pandas", "scipy", "scikit-learn", "setuptools", "ray"]:
    try:
        print(f"  {n}=={version(n)}")
    except Exception:
        print(f"  {n}: not installed")
import torch
print(f"  torch CUDA build: {torch.version.cuda is not None} (must be False)")
PYEOF
echo "[setup_recbole] python: $PY"
