#!/usr/bin/env bash
# Creates .venv-ref with the reference implementation (PyTorch, transformers,
# open_clip) for fixture generation and the side-by-side benchmarks.
# Not needed to build, test or run clipdex. Downloads about 4.6 GB.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv-ref/bin/python ]; then
  python3 -m venv .venv-ref
fi
.venv-ref/bin/pip install --quiet --upgrade pip
.venv-ref/bin/pip install --quiet -r scripts/reference/requirements.txt
.venv-ref/bin/python -c "import torch, transformers, open_clip; print('reference ready: torch', torch.__version__, 'transformers', transformers.__version__)"
