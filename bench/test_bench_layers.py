"""pytest-benchmark: every layer type at the standard shapes (see bench/conftest.py for the workflow).

One parametrized file for lstm, gru and rnn_tanh: the same cases the three per-cell files had
(CPU: fusedrnn-auto vs torch-cpu, inference and training, at CPU_SHAPES; GPU: fusedrnn vs cudnn,
bf16 and fp32, at GPU_SHAPES).
"""
import pytest
from conftest import CPU_PROVIDERS, CPU_SHAPES, GPU_PROVIDERS, GPU_SHAPES, bench_case

CELLS = ("lstm", "gru", "rnn_tanh")
MODES = ("inference", "training")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B,H", CPU_SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in CPU_SHAPES])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu(benchmark, cell, provider, T, B, H, mode):
    bench_case(benchmark, cell, provider, T, B, H, mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B,H", GPU_SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in GPU_SHAPES])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu(benchmark, cell, provider, T, B, H, mode, dtype):
    bench_case(benchmark, cell, provider, T, B, H, mode, "cuda", dtype)
