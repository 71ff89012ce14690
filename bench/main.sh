#!/usr/bin/env bash
# The main job (README quick start): install, then verify the fused kernels against the float64
# reference and benchmark them on this machine's best device (CUDA if present, else the CPU, where
# the kernels run through the Triton interpreter and the timings compare the CPU paths).
# Results go to bench/out/<device>-<date>/ (or $FUSEDRNN_RESULTS); bench/out/ is git-ignored, and
# results worth keeping are copied to bench/results/ by hand.
# CPU timing: one torch thread, the calling thread's CPU time, providers interleaved, repetitions
# from a time budget, the load watched at every point (see bench/README.md);
# bench/reproducibility.py checks that two runs agree.
set -euo pipefail
cd "$(dirname "$0")/.."
if python -c "import torch, triton" 2>/dev/null; then
    # torch and Triton already there (e.g. a GPU machine, possibly offline): install only us.
    python -m pip install -q --no-deps --no-build-isolation -e . \
        || echo "note: pip install failed; running from the source checkout"
    python -c "import matplotlib, tqdm" 2>/dev/null || python -m pip install -q matplotlib tqdm \
        || echo "note: matplotlib/tqdm unavailable: no plot or progress bar"
else
    # The CPU build of torch lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[bench]"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    device=cuda
    name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
    quick=()
else
    device=cpu
    name=cpu
    # verify: its CPU default (the quick grid, backends auto and triton); bench: the quick sweep on
    # one pinned torch thread
    quick=(--quick --threads 1)
    export TRITON_INTERPRET=1
fi
out="${FUSEDRNN_RESULTS:-bench/out/${name}-$(date +%Y-%m-%d)}"
mkdir -p "$out"
python -m fusedrnn verify --device "$device" | tee "$out/verify.txt"
python -m fusedrnn bench --device "$device" ${quick[@]+"${quick[@]}"} --out "$out/bench.json" \
    --md "$out/bench.md" --plot "$out/bench.png"
echo "results in $out"
