#!/usr/bin/env bash
# Installs tpsvit and its dependencies; fetches the Fashion-MNIST Debian package when apt can.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch/torchvision first, pinned to the wheels this workplace keeps on disk; the package itself asks only for ranges.
if ! $PY -c "import torch, torchvision" 2>/dev/null; then
    $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
$PY -m pip install -q -e ".[dev,export,hf]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "note: could not install dataset-fashion-mnist; tpsvit will try torchvision's download instead"
fi
