"""Tensors between ranks: buffer-based mpi4py Isend/Irecv on the tensors' own memory, tagged by
mini-batch, and waits that poll with a back-off instead of spinning a core (they spin only for
the expected duration of a transfer known to be under way, see SPIN_RATE).

No tensor is ever pickled: a sender hands MPI the memory of a dense tensor, a receiver a
preallocated buffer laid out as its cut descriptor says. Tags encode (mini-batch, direction,
tensor index), so a message can only match the receive posted for it, whatever order the ranks
reach their calls in. Every rank counts the bytes and messages it sends and receives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

from hpcsrl.pipeline.cuts import TensorSpec

ACTIVATION, GRADIENT = 0, 1
MAX_ITEMS = 64
# Back-off of a polling wait: the first polls only yield the core (a small message completes
# within microseconds); after that a wait sleeps a tenth of the time it has waited so far, at
# most MAX_SLEEP_S. So a long wait costs ~nothing and a transfer finishes at most ~10 % later
# than it would with a spinning wait.
YIELD_POLLS = 16
SLEEP_FRACTION = 0.1
MIN_SLEEP_S = 20e-6
MAX_SLEEP_S = 2e-3
# A transfer expected to be under way (a send: its receiver is free and posts its receive at
# once, or reserved while busy, then the spin simply ends at its bound; an activation receive:
# WORK is issued only when the sender holds it) is polled without sleeping or yielding for
# SPIN_MIN_S + its bytes at SPIN_RATE (a conservative copy rate; shared memory measured 4-6 GB/s
# here), then backs off as any wait. Why: a large message moves inside the MPI
# calls of both sides (OpenMPI's rendezvous: the receiver copies once it sees the sender's
# request, the sender's request completes when it sees the receiver's answer), so each sleep
# across a hand-over delays the transfer by the sleep plus the wake-up, which under load costs
# more than the copy (measured: 0.27-0.69 of raw from 1 to 64 MB at load 14). A gradient
# receive waits for the next stage's compute: it sleeps as before.
SPIN_MIN_S = 100e-6
SPIN_RATE = 1e9


def tag_of(mb: int, kind: int, item: int, tag_ub: int) -> int:
    return ((mb * 2 + kind) * MAX_ITEMS + item) % (tag_ub + 1)


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also plainly contiguous)."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def dense_view(t: Tensor, use: str = "sent") -> Tensor:
    """A detached contiguous view of a dense tensor's memory in storage order (a channels-last
    tensor permuted to NHWC), no copy; `use` names what needs it in the error."""
    if is_channels_last(t):
        t = t.permute(0, 2, 3, 1)
    if not t.is_contiguous():
        raise ValueError(f"only dense tensors can be {use}")
    return t.detach()


def as_buffer(t: Tensor) -> np.ndarray:
    """A contiguous numpy view of a dense tensor's memory (channels-last included), no copy."""
    return dense_view(t).numpy()


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    wait_s: float = 0.0


@dataclass
class Pending:
    """Requests in flight and the tensors whose memory they use (kept alive until done);
    `expect_s`: how long the transfer should take once under way (0: nothing known to be under
    way, e.g. a receive whose sender is still computing)."""

    requests: list[MPI.Request]
    tensors: list[Tensor] = field(default_factory=list)
    expect_s: float = 0.0

    def test(self) -> bool:
        return bool(MPI.Request.Testall(self.requests)) if self.requests else True


class Waiter:
    """Completes requests without spinning: `Test` polls with a growing sleep (or, in "block"
    mode, MPI's own blocking wait, to compare with `--mca mpi_yield_when_idle 1`).

    `on_poll()` runs between polls (heartbeats, failure checks); it may raise to abandon the wait.
    """

    def __init__(self, mode: str = "poll", max_sleep_s: float = MAX_SLEEP_S,
                 on_poll: Callable[[str], None] | None = None) -> None:
        if mode not in ("poll", "block"):
            raise ValueError(f"wait mode {mode!r}: poll or block")
        self.mode, self.max_sleep = mode, max_sleep_s
        self.on_poll = on_poll
        self.wait_s = 0.0

    def wait(self, pending: Pending | Sequence[Pending], activity: str) -> None:
        items = [pending] if isinstance(pending, Pending) else list(pending)
        reqs = [r for p in items for r in p.requests]
        if not reqs:
            return
        t0 = time.perf_counter()
        expect = sum(p.expect_s for p in items)
        spin_until = t0 + SPIN_MIN_S + expect if expect > 0 else t0
        try:
            if self.mode == "block":
                MPI.Request.Waitall(reqs)
                return
            polls = 0
            while not MPI.Request.Testall(reqs):
                if self.on_poll is not None:
                    self.on_poll(activity)
                polls += 1
                now = time.perf_counter()
                if now < spin_until:  # under way: poll at once (a yield may cost a time slice)
                    continue
                if polls <= YIELD_POLLS:
                    time.sleep(0)
                    continue
                waited = now - t0
                time.sleep(min(self.max_sleep, max(MIN_SLEEP_S, SLEEP_FRACTION * waited)))
        finally:
            self.wait_s += time.perf_counter() - t0


class Transport:
    """Point-to-point tensor messages on one communicator."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.tag_ub = int(comm.Get_attr(MPI.TAG_UB) or 32767)
        self.counters = Counters()
        self._buffers: dict[tuple[int, tuple[TensorSpec, ...]], list[Tensor]] = {}

    def buffers(self, specs: Sequence[TensorSpec], slot: int = 0) -> list[Tensor]:
        """Preallocated receive buffers for these descriptors (reused; `slot` tells apart two
        sets that must coexist, e.g. activations in and gradients in)."""
        key = (slot, tuple(specs))
        if key not in self._buffers:
            self._buffers[key] = [s.empty() for s in specs]
        return self._buffers[key]

    def send(self, tensors: Sequence[Tensor], dest: int, mb: int, kind: int) -> Pending:
        reqs = []
        for i, t in enumerate(tensors):
            buf = as_buffer(t)
            reqs.append(self.comm.Isend(buf, dest=dest, tag=tag_of(mb, kind, i, self.tag_ub)))
            self.counters.bytes_sent += buf.nbytes
            self.counters.messages_sent += 1
        return Pending(reqs, list(tensors), _expected_s(tensors))

    def recv(self, buffers: Sequence[Tensor], source: int, mb: int, kind: int) -> Pending:
        reqs = []
        for i, t in enumerate(buffers):
            buf = as_buffer(t)
            reqs.append(self.comm.Irecv(buf, source=source, tag=tag_of(mb, kind, i, self.tag_ub)))
            self.counters.bytes_received += buf.nbytes
            self.counters.messages_received += 1
        return Pending(reqs, list(buffers), _expected_s(buffers) if kind == ACTIVATION else 0.0)


def _expected_s(tensors: Sequence[Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / SPIN_RATE
