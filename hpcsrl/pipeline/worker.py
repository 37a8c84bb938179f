"""One rank's loop: ask the scheduler, receive, compute, hand on, aggregate; count everything.

The loop knows the transport, the scheduler client and a `StageCompute`; it never touches modules
or data, so an emulated compute runs through exactly this code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hpcsrl.pipeline.compute import StageCompute
from hpcsrl.pipeline.coordinator import FORWARDED, FREE, SchedulerClient
from hpcsrl.pipeline.schedule import AGGREGATE, ROUTE, STOP, WORK, Action
from hpcsrl.pipeline.topology import Layout
from hpcsrl.pipeline.transport import ACTIVATION, GRADIENT, Pending, Transport, Waiter


@dataclass
class WorkerStats:
    iterations: int = 0
    since_aggregation: int = 0
    busy_s: float = 0.0
    aggregate_s: float = 0.0
    loss_sum: float = 0.0
    loss_n: int = 0


class StageWorker:
    """`on_aggregate(round, final)` runs at every AGGREGATE and at STOP (replica averaging and
    checkpointing; it may use the transport's waiter)."""

    def __init__(self, layout: Layout, rank: int, compute: StageCompute, transport: Transport,
                 client: SchedulerClient, waiter: Waiter,
                 on_aggregate: Callable[[int, bool], None]) -> None:
        self.layout, self.rank = layout, rank
        self.stage = layout.stage_of(rank)
        self.first, self.last = self.stage == 0, self.stage == layout.stages - 1
        self.compute, self.transport, self.client, self.waiter = compute, transport, client, waiter
        self.on_aggregate = on_aggregate
        self.stats = WorkerStats()
        # the last gradient sent upstream and what to say if it stalls: completed before the
        # next mini-batch or aggregation, not before asking for work (asking first takes the
        # completion's wake-ups off the chain's critical path; polling for the reply progresses
        # the send)
        self._sending: tuple[Pending, str] | None = None

    def _complete_send(self) -> None:
        if self._sending is not None:
            self.waiter.wait(*self._sending)
            self._sending = None

    def run(self) -> None:
        action = self.client.request(FREE)
        while True:
            if action.kind == WORK:
                action = self._work(action)
            elif action.kind in (AGGREGATE, STOP):
                self._complete_send()
                t0 = time.perf_counter()
                self.on_aggregate(action.round, action.kind == STOP)
                self.stats.aggregate_s += time.perf_counter() - t0
                self.stats.since_aggregation = 0
                if action.kind == STOP:
                    return
                action = self.client.request(FREE)
            else:
                raise RuntimeError(f"rank {self.rank}: unexpected scheduler action {action}")

    def _work(self, a: Action) -> Action:
        self._complete_send()
        mb, src = a.mb, a.peer
        c, tr, desc = self.compute, self.transport, self.layout.describe
        inputs = None
        if not self.first:
            assert c.in_spec is not None
            inputs = tr.buffers(c.in_spec.tensors, slot=0)
            self.waiter.wait(tr.recv(inputs, src, mb, ACTIVATION),
                             f"receiving mini-batch {mb} from {desc(src)}")
        t0 = time.perf_counter()
        outputs = c.forward(mb, inputs)
        busy = time.perf_counter() - t0
        grads = None
        if not self.last:
            assert c.out_spec is not None and outputs is not None
            route = self.client.request(FORWARDED, mb)
            if route.kind != ROUTE or route.mb != mb:
                raise RuntimeError(f"rank {self.rank}: expected a route for mini-batch {mb}, "
                                   f"got {route}")
            dst = route.peer
            grads = tr.buffers(c.out_spec.grad_specs(), slot=1)
            back = tr.recv(grads, dst, mb, GRADIENT)  # posted before the activation leaves
            sent = tr.send(outputs, dst, mb, ACTIVATION)
            self.waiter.wait([sent, back], f"waiting for mini-batch {mb}'s gradient from "
                                           f"{desc(dst)}")
            del outputs
        t0 = time.perf_counter()
        grads_in = c.backward(grads)
        up = tr.send(grads_in, src, mb, GRADIENT) if not self.first and grads_in else None
        c.step(mb)
        busy += time.perf_counter() - t0
        if up is not None:
            self._sending = (up, f"sending mini-batch {mb}'s gradient to {desc(src)}")
        st = self.stats
        st.iterations += 1
        st.since_aggregation += 1
        st.busy_s += busy
        if self.last and c.loss is not None:
            st.loss_sum += c.loss
            st.loss_n += 1
        return self.client.request(FREE, mb, busy)
