"""pytest-benchmark: rnn (see bench/conftest.py for the workflow)."""
import pytest
from conftest import CPU_PROVIDERS, CPU_SHAPES, GPU_PROVIDERS, GPU_SHAPES, bench_case

CELL = "rnn_tanh"


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("T,B,H", CPU_SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in CPU_SHAPES])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_rnn_cpu(benchmark, provider, T, B, H, mode):
    bench_case(benchmark, CELL, provider, T, B, H, mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("T,B,H", GPU_SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in GPU_SHAPES])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_rnn_gpu(benchmark, provider, T, B, H, mode, dtype):
    bench_case(benchmark, CELL, provider, T, B, H, mode, "cuda", dtype)
