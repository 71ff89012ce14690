"""DDP and FSDP2 with fusedrnn layers: two CPU processes over gloo train the same model with
torch.nn's LSTM and with fusedrnn's for a few steps; the parameters must agree across ranks and
with torch.nn's (exactly on the default backend, which runs torch's op on CPU; within float32
rounding on the Triton kernels through the interpreter)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import assert_close_rel

STEPS = 2


class Model(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).sum()


def _train(rank, impl, wrap, backend):
    import fusedrnn
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4) if impl == "torch" else fusedrnn.LSTM(3, 4, backend=backend)
    model = Model(rnn)
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.rnn)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        model(x).backward()
        opt.step()
    state = model.state_dict()
    if wrap == "fsdp":
        return {k: v.full_tensor() for k, v in state.items()}
    return {k.removeprefix("module."): v for k, v in state.items()}


def _worker(rank, world, port, wraps, backend, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {(wrap, impl): _train(rank, impl, wrap, backend) for wrap in wraps
                  for impl in ("torch", "fused")}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One pair of processes per backend (starting them costs most of the time); the kernels through
# the interpreter cost seconds per step, so DDP alone covers them.
@pytest.mark.parametrize("wraps,backend", [(("ddp", "fsdp"), "auto"),
                                           pytest.param(("ddp",), "triton", marks=pytest.mark.triton)])
def test_two_ranks_train_like_torch_nn(wraps, backend, tmp_path, request):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not built in")
    if backend == "triton":
        request.getfixturevalue("triton_device")
    # the children inherit TRITON_INTERPRET from the environment tests/conftest.py set up
    mp.spawn(_worker, args=(2, _free_port(), wraps, backend, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    initial = Model(nn.LSTM(3, 4)).state_dict()
    for wrap in wraps:
        fused, ref = r0[(wrap, "fused")], r0[(wrap, "torch")]
        assert fused.keys() == ref.keys()
        for k in ref:
            assert torch.equal(fused[k], r1[(wrap, "fused")][k]), f"{wrap}: {k} differs across ranks"
            assert_close_rel(fused[k], ref[k], 0.0 if backend == "auto" else 1e-5, f"{wrap}: {k}")
        assert not torch.equal(ref["rnn.weight_hh_l0"], initial["rnn.weight_hh_l0"]), "no training happened"
