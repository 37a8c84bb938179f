"""The scheduler driven by a discrete-event simulation of ranks (no MPI, no sleeping).

Every rank computes for a fixed forward and backward time; hand-overs optionally cost `hop_s`.
This is what the one-mini-batch-per-node model of `hpcsrl plan` leaves out: ranks wait for each
other (a stage-0 node holds its mini-batch while it queues for a busy next-stage replica), so the
simulated rate is what the scheduler itself can reach on a cluster with these times, and the gap
to a measured run is the runtime's own cost. The tests drive the scheduler's invariants through
it; the DHP benchmarks put its rate next to the measured one.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping

from hpcsrl.pipeline.schedule import AGGREGATE, ROUTE, STOP, WORK, Action, Scheduler


def simulate(sched: Scheduler, fwd: Mapping[int, float], bwd: Mapping[int, float],
             hop_s: float = 0.0) -> tuple[float, list[Action]]:
    """Run `sched` to its end; returns (finish time, every action in order).

    Raises RuntimeError when the scheduler breaks its invariants: work for a rank that holds a
    mini-batch, a route for a mini-batch the rank does not hold, aggregation with mini-batches
    in flight, or a rank never stopped.
    """
    layout = sched.layout
    last = layout.stages - 1
    events: list[tuple[float, int, str, int, int]] = []
    seq = itertools.count()
    holding: dict[int, int] = {}
    upstream: dict[int, int] = {}
    log: list[Action] = []
    stopped: set[int] = set()

    def push(t: float, kind: str, rank: int, mb: int = -1) -> None:
        heapq.heappush(events, (t, next(seq), kind, rank, mb))

    def apply(t: float, actions: list[Action]) -> None:
        for a in actions:
            log.append(a)
            if a.kind == WORK:
                if a.rank in holding:
                    raise RuntimeError(f"rank {a.rank} got mini-batch {a.mb} while holding "
                                       f"{holding[a.rank]}")
                holding[a.rank] = a.mb
                upstream[a.rank] = a.peer
                start = t + (hop_s if a.peer >= 0 else 0.0)
                if layout.stage_of(a.rank) == last:
                    push(start + fwd[a.rank] + bwd[a.rank], "backward_done", a.rank, a.mb)
                else:
                    push(start + fwd[a.rank], "forward_done", a.rank, a.mb)
            elif a.kind == ROUTE:
                if holding.get(a.rank) != a.mb:
                    raise RuntimeError(f"rank {a.rank} routed mini-batch {a.mb} it does not hold")
            elif a.kind in (AGGREGATE, STOP):
                if holding:
                    raise RuntimeError("aggregation while mini-batches are in flight")
                if a.kind == STOP:
                    stopped.add(a.rank)
                else:
                    push(t, "free", a.rank)

    for r in range(layout.size):
        apply(0.0, sched.free(r, now=0.0))
    t = 0.0
    while events:
        t, _, kind, rank, mb = heapq.heappop(events)
        if kind == "forward_done":
            apply(t, sched.forwarded(rank, mb, now=t))
        elif kind == "grad":
            push(t + bwd[rank], "backward_done", rank, mb)
        elif kind == "backward_done":
            up = upstream.pop(rank)
            if up >= 0:
                push(t + hop_s, "grad", up, mb)
            del holding[rank]
            apply(t, sched.free(rank, mb, fwd[rank] + bwd[rank], now=t))
        elif kind == "free":
            apply(t, sched.free(rank, now=t))
    if stopped != set(range(layout.size)):
        raise RuntimeError(f"ranks {sorted(set(range(layout.size)) - stopped)} were never "
                           "stopped")
    return t, log


def simulated_rate(replicas: list[int], stage_fwd: list[float], stage_bwd: list[float],
                   total: int, aggregate_every: int, policy: str = "dynamic",
                   slowdown: Mapping[int, float] | None = None,
                   hop_s: float = 0.0) -> tuple[float, dict[int, int]]:
    """Mini-batches per second and iterations per rank of `total` mini-batches with these
    per-stage times (seconds), `slowdown[rank]` multiplying a rank's times."""
    from hpcsrl.pipeline.topology import Layout

    layout = Layout.of(replicas)
    slow = slowdown or {}
    fwd = {r: stage_fwd[layout.stage_of(r)] * slow.get(r, 1.0) for r in range(layout.size)}
    bwd = {r: stage_bwd[layout.stage_of(r)] * slow.get(r, 1.0) for r in range(layout.size)}
    sched = Scheduler(layout, total=total, aggregate_every=aggregate_every, policy=policy)
    t, _ = simulate(sched, fwd, bwd, hop_s)
    return total / t, sched.counts()
