"""Weighted averaging of a stage's replicas on the stage communicator (parameters, BatchNorm
statistics, SGD momentum), weighted by the mini-batches each replica ran since the last time.

Replicas of a dynamic stage run different counts (e.g. 329/331/340 in the paper's Table 6), so a
plain mean would over-weight the replica that learned least. The weighted sum is reduced to
replica 0 and broadcast, so every replica ends bit-identical (an allreduce may round differently
on different ranks). Integer buffers (BatchNorm's batch counters) add up their increments.
The sum runs in float64 through one buffer of CHUNK elements, reduced a chunk at a time, so
averaging costs a stage at most 2 x 8 x CHUNK bytes more memory, not several copies of its state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

from hpcsrl.pipeline.transport import Pending, dense_view

CHUNK = 1 << 20  # float64 elements per reduction (8 MiB)


class Aggregator:
    def __init__(self, comm: MPI.Comm, wait: Callable[[Pending, str], None],
                 counters: list[Tensor]) -> None:
        """`counters`: the integer buffers as they are before training (their common base)."""
        self.comm, self.wait = comm, wait
        self._base = [c.clone() for c in counters]

    def __call__(self, state: list[Tensor], counters: list[Tensor], processed: int,
                 what: str) -> float:
        """Average `state` in place with weight processed / sum(processed); returns the weight."""
        if self.comm.Get_size() == 1:
            self._base = [c.clone() for c in counters]
            return 1.0
        n = np.array([processed], dtype=np.int64)
        total = np.zeros(1, dtype=np.int64)
        self.wait(Pending([self.comm.Iallreduce(n, total, op=MPI.SUM)]), what)
        size = self.comm.Get_size()
        w = processed / int(total[0]) if total[0] > 0 else 1.0 / size
        if state:
            self._weighted_sum(state, w, what)
        if counters:
            inc = np.array([int(c) - int(b) for c, b in zip(counters, self._base, strict=True)],
                           dtype=np.int64)
            out = np.zeros_like(inc)
            self.wait(Pending([self.comm.Iallreduce(inc, out, op=MPI.SUM)]), what)
            with torch.no_grad():
                for c, b, d in zip(counters, self._base, out, strict=True):
                    c.fill_(int(b) + int(d))
            self._base = [c.clone() for c in counters]
        return w


    def _weighted_sum(self, state: list[Tensor], w: float, what: str) -> None:
        """state <- sum over replicas of w_i state_i, chunk by chunk (pieces of tensors)."""
        n = sum(t.numel() for t in state)
        size = min(CHUNK, n)
        flat = torch.empty(size, dtype=torch.float64)
        summed = torch.empty(size, dtype=torch.float64)
        pieces: list[tuple[Tensor, int]] = []  # (piece of a tensor, its offset in `flat`)
        used = 0

        def flush() -> None:
            a, b = flat[:used].numpy(), summed[:used].numpy()
            self.wait(Pending([self.comm.Ireduce(a, b, op=MPI.SUM, root=0)]), what)
            self.wait(Pending([self.comm.Ibcast(b, root=0)]), what)
            for piece, at in pieces:
                piece.copy_(summed[at:at + piece.numel()])
            pieces.clear()

        with torch.no_grad():
            for t in state:
                v, start = dense_view(t, "averaged in place").view(-1), 0
                while start < v.numel():
                    k = min(v.numel() - start, size - used)
                    piece = v[start:start + k]
                    flat[used:used + k].copy_(piece).mul_(w)
                    pieces.append((piece, used))
                    used += k
                    start += k
                    if used == size:
                        flush()
                        used = 0
            if used:
                flush()


def digest(tensors: list[Tensor]) -> str:
    """A short hash of tensors' values (replicas of a stage must agree after aggregation)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
