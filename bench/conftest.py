"""pytest-benchmark benchmarks for the standard shapes (bench/test_bench_layers.py: lstm, gru, rnn_tanh).

    pytest bench --benchmark-only                              # run; groups compare providers
    pytest bench --benchmark-only --benchmark-autosave         # save .benchmarks/... JSON
    pytest bench --benchmark-only --benchmark-compare          # compare with the last save
    pytest bench --benchmark-only -k cpu                       # only the CPU comparison

CPU: fusedrnn's default CPU path (backend="auto", torch's fused ops) vs torch.nn on the CPU at
T=100,B=64,H=256 and T=500,B=1,H=64, inference and training (forward+backward); the target is
fusedrnn within 1.1x of torch.nn (compare the two rows of each group).
GPU (skipped without CUDA): fusedrnn (backend="triton") vs cuDNN (torch.nn on CUDA), bf16 and
fp32, at a few of the issue's sweep shapes; the full sweep is `fusedrnn bench` / gpu_check.sh.
Each timed call synchronizes the GPU, so the timings are wall-clock per call.
The models and inputs come from fusedrnn.tools.sweep.build, the same as `fusedrnn bench`.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Without CUDA, a fusedrnn module with backend="triton" would need the interpreter; none of the
# CPU benchmarks use it, but keep imports of fusedrnn.kernels safe either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

CPU_SHAPES = [(100, 64, 256), (500, 1, 64)]  # (T, B, H), input size = H
CPU_PROVIDERS = ("fusedrnn-auto", "torch-cpu")
GPU_SHAPES = [(1024, 64, 512), (1024, 8, 256), (512, 64, 512)]
GPU_PROVIDERS = ("fusedrnn", "cudnn")
PASSES = {"inference": "inference", "training": "fwdbwd"}  # name in the test id -> spec.PASSES


def bench_case(benchmark, cell, provider, T, B, H, mode, device, dtype="fp32"):
    from fusedrnn.tools.roofline import Problem, flops
    from fusedrnn.tools.sweep import build

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    p = Problem(cell=cell, seq=T, batch=B, input=H, hidden=H, dtype=dtype, pass_=PASSES[mode])
    fn, grads = build(provider, p, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        for t in grads:
            t.grad = None
        fn()
        sync()

    call()  # warm-up: Triton compilation, cuDNN plans, allocator
    benchmark.group = f"{cell} {device} {dtype} T{T} B{B} H{H} {mode}"
    benchmark.extra_info.update(provider=provider, cell=cell, T=T, B=B, H=H, mode=mode,
                                dtype=dtype, device=device, flops=flops(p))
    benchmark(call)
