"""BatchNorm over the global batch: plain BatchNorm outside a process group, and with two gloo processes
the same outputs, running statistics and gradients as one process on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn

from cnnlab.sync_batchnorm import SyncedBatchNorm1d, SyncedBatchNorm2d, sync_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))


def test_conversion_keeps_parameters_buffers_and_keys():
    net = _net()
    keys, params = list(net.state_dict()), [id(p) for p in net.parameters()]
    assert sync_batchnorm(net) == 2
    assert type(net[1]) is SyncedBatchNorm2d and type(net[5]) is SyncedBatchNorm1d
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    assert sync_batchnorm(net) == 0  # already converted


def test_without_a_process_group_it_is_plain_batchnorm():
    plain, synced = _net(), _net()
    sync_batchnorm(synced)
    x = torch.randn(8, 3, 8, 8)
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(synced, mode)()
        assert torch.equal(plain(x), synced(x))
    for a, b in zip(plain.state_dict().values(), synced.state_dict().values()):
        assert torch.equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, x: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        net = _net()
        sync_batchnorm(net)
        net.train()
        half = x.chunk(2)[rank].clone().requires_grad_(True)
        # each rank's loss is the mean over its half: their average is the whole batch's mean
        (net(half) ** 2).sum(1).mean().backward()
        for p in net.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= 2  # what DistributedDataParallel does
        out[rank] = {"input_grad": half.grad, "grads": [p.grad for p in net.parameters()],
                     "buffers": [b.clone() for b in net.buffers()]}
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch has no gloo backend")
def test_two_processes_match_one_process_on_the_whole_batch():
    import torch.multiprocessing as mp

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    whole = x.clone().requires_grad_(True)
    net = _net().train()
    (net(whole) ** 2).sum(1).mean().backward()

    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_rank, args=(_free_port(), x, out), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = out[rank]
        torch.testing.assert_close(got["input_grad"] / 2, whole.grad.chunk(2)[rank], rtol=1e-4, atol=1e-5)
        for a, b in zip(got["grads"], [p.grad for p in net.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float sums in another order
        for a, b in zip(got["buffers"], net.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
