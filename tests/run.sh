#!/usr/bin/env bash
# The test command (README quick start): installs what the tests need, then runs them all.
# Without a GPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: the CPU build lies on disk here, while an unpinned torch would pull a
# multi-GB CUDA build. A machine that already has torch (e.g. a GPU box) keeps its own.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,bench,onnx]"
exec python -m pytest tests "$@"
