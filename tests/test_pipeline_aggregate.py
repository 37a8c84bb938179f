"""Replica averaging a chunk at a time (no MPI: a stand-in communicator with a fixed peer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcsrl.pipeline import aggregate
from hpcsrl.pipeline.aggregate import Aggregator
from hpcsrl.pipeline.transport import dense_view


class PeerComm:
    """Two replicas: the peer ran `peer_n` mini-batches and holds `peer_scale` x our state."""

    def __init__(self, peer_n: int, peer_scale: float) -> None:
        self.peer_n, self.peer_scale, self.reduces = peer_n, peer_scale, 0
        self.own_n = 0

    def Get_size(self) -> int:
        return 2

    def Iallreduce(self, a: np.ndarray, b: np.ndarray, op: object) -> None:
        self.own_n = int(a[0]) if a.dtype == np.int64 and a.size == 1 else self.own_n
        b[:] = a + (self.peer_n if a.size == 1 else 0)

    def Ireduce(self, a: np.ndarray, b: np.ndarray, op: object, root: int) -> None:
        self.reduces += 1
        w_own = self.own_n / (self.own_n + self.peer_n)
        w_peer = self.peer_n / (self.own_n + self.peer_n)
        b[:] = a + a / w_own * self.peer_scale * w_peer  # the peer's weighted share

    def Ibcast(self, b: np.ndarray, root: int) -> None:
        pass


def test_weighted_average_in_chunks_over_channels_last_tensors(monkeypatch) -> None:
    monkeypatch.setattr(aggregate, "CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 6, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    state = [conv, torch.randn(2500, generator=g), torch.randn(7, generator=g)]
    before = [t.clone() for t in state]
    comm = PeerComm(peer_n=3, peer_scale=2.0)
    w = Aggregator(comm, lambda pending, what: None, [])(state, [], 1, "test")
    assert w == pytest.approx(0.25)
    assert comm.reduces == 4  # 1200 + 2500 + 7 elements through a 1000-element buffer
    for t, b in zip(state, before, strict=True):
        torch.testing.assert_close(t, b * (0.25 + 0.75 * 2.0))  # (1 x t + 3 x 2t) / 4
    assert state[0].is_contiguous(memory_format=torch.channels_last)


def test_dense_view_shares_memory_and_refuses_strided() -> None:
    t = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    dense_view(t).view(-1)[0] = 1.0
    assert t[0, 0, 0, 0] == 1.0
    with pytest.raises(ValueError, match="dense"):
        dense_view(torch.zeros(4, 4)[:, ::2])
