#!/usr/bin/env bash
# Run benchmarks/cuda_check.py on a CUDA machine without network access.
# Expects the mlx-cuda-13 tree (unpacked wheel, optionally as split .tar.xz parts) and
# the mlx / mlx-lm / grpc wheels in $WHEELS; the machine's Python must already have the
# CUDA 13 libraries (nvidia-* wheels, e.g. from a PyTorch cu130 install) and
# transformers, numpy, safetensors, matplotlib, tqdm, click.
set -euo pipefail
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/optiq-site}
PY=${PY:-python3}
mkdir -p "$SITE"
if ls "$WHEELS"/mlxcuda.part.* >/dev/null 2>&1; then
  cat "$WHEELS"/mlxcuda.part.* | xz -d | tar xf - -C "$SITE"
fi
for w in "$WHEELS"/*.whl; do $PY -m zipfile -e "$w" "$SITE"; done
NV=$($PY -c "import nvidia, os; p = list(nvidia.__path__)[0]; print(':'.join(os.path.join(p, d, 'lib') for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, 'lib'))))")
export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$SITE:$(ls -d "$PWD"/packages/*/src | paste -sd:)"
export PYTHONUNBUFFERED=1
$PY benchmarks/cuda_check.py "${OUT:-/tmp/optiq-cuda}"
