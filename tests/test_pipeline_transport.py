"""The transport on one rank (COMM_SELF): raw buffers, counters, and which waits may spin."""

from __future__ import annotations

import torch
from mpi4py import MPI

from hpcsrl.pipeline import transport
from hpcsrl.pipeline.cuts import TensorSpec
from hpcsrl.pipeline.transport import ACTIVATION, GRADIENT, Transport, Waiter


def test_only_transfers_under_way_get_a_spin_window() -> None:
    tr, waiter = Transport(MPI.COMM_SELF.Dup()), Waiter("poll")
    spec = TensorSpec((2, 8, 4, 4), torch.float32, True, True)  # channels-last, 1 KiB
    x = torch.randn(spec.shape).contiguous(memory_format=torch.channels_last)
    for kind in (ACTIVATION, GRADIENT):
        inbox = tr.buffers([spec], slot=kind)
        got = tr.recv(inbox, 0, mb=7, kind=kind)
        sent = tr.send([x], 0, mb=7, kind=kind)
        # a send starts at once; an activation's sender holds it when WORK is issued; a
        # gradient waits for the next stage's compute, so its receive sleeps from the start
        assert sent.expect_s == spec.nbytes / transport.SPIN_RATE
        assert got.expect_s == (sent.expect_s if kind == ACTIVATION else 0.0)
        waiter.wait([sent, got], "self")
        assert torch.equal(inbox[0], x) and inbox[0].is_contiguous(
            memory_format=torch.channels_last)
    c = tr.counters
    assert (c.bytes_sent, c.bytes_received, c.messages_sent) == (2048, 2048, 2)
