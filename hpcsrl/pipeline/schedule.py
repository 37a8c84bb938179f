"""Chains of stage replicas as a pure event-driven state machine (no MPI, no torch).

Design. One scheduler (a thread of rank 0, see `coordinator.py`) decides every hand-over; ranks
tell it two things and it answers each with exactly one action:

    free(rank, done_mb, busy_s)  the rank finished mini-batch done_mb's backward (or started, or
                                 aggregated) and holds nothing -> later: WORK, AGGREGATE or STOP
    forwarded(rank, mb)          the rank finished mb's forward and needs a next-stage replica
                                 -> later: ROUTE(dst)
    WORK(mb, src)                start mb: receive its activation from rank src (src -1: stage 0,
                                 read the mini-batch from the data)
    ROUTE(mb, dst)               send mb's activation to rank dst, then wait for its gradient

Dynamic chains (Fig. 4b): a forward request goes to the next-stage replica expected to finish
it first: a free replica finishes at now + its running average of own compute per mini-batch, a
busy one at its expected release (when it got its mini-batch + its running average of time held,
which includes waiting downstream) + that average. The stages after it take the same time
whichever replica it is, so they do not enter the comparison (holds would bring their queueing
noise in). If the best replica is busy (a slow free node is not worth it) and nothing is
reserved on it yet, the request is routed to it at once and reserved: the sender posts its
activation now and the replica starts it the moment it frees, so neither the sender's wake-up
nor a scheduler round trip lies between the replica's two mini-batches; if the best is busy and
reserved, the request waits. So a slower node gets proportionally less work, and with equal
nodes requests go to whichever is free (or frees first). The backward returns along the same
chain (each rank remembers its upstream rank). Fixed chains (Fig. 4a, `FixedChains` at the
end): C = max_s r_s chains, chain c is replica c mod r_s of every stage, routing goes to the
chain neighbour, chain c gets every C-th mini-batch id of each window, and a replica shared by
several chains takes their ids in increasing order (round-robin).

Mini-batch ids are issued in increasing order (per chain with fixed chains), to stage-0 replicas
only, windows of K at a time. When a window's ids are all issued and every rank is free, all
ranks get AGGREGATE (average the replicas of each stage, checkpoint), or STOP after the last
window. Stage-0 admission (dynamic): while a window has more ids left than stage 0 has replicas,
every free stage-0 replica gets the next id (a free replica left idle only lowers the rate, as
each holds one mini-batch at a time); the last ids, which the aggregation waits for, go one by
one to the stage-0 replica expected to finish them first, free or busy, so a slow node does not
end the window late (`_admissions`).

Invariants (tested in tests/test_pipeline_schedule.py by simulation):
  1. A rank holds at most one mini-batch: it gets WORK only while free and is free again only
     after its own backward (one outstanding request per rank, one answer per request).
  2. Every id in [first, total) is issued exactly once; `assignment[mb]` records its chain.
  3. ROUTE names a free replica, which is sent WORK(mb, src) at the same moment, or (dynamic) a
     busy one reserved for it (at most one reservation per replica), which is sent WORK(mb, src)
     in the very dispatch that sees it free, before anything else can claim it. The sender has
     posted its gradient receive before it sends. A send to a busy receiver waits only for that
     receiver's current mini-batch, whose chain runs on later stages only, so waits never form
     a cycle, and tags (mini-batch, direction) keep the early message from matching anything
     else.
  4. AGGREGATE/STOP are sent only when no mini-batch is in flight and every rank is free (a
     reserved rank is never free: it starts its reservation), so all replicas of a stage enter
     the stage collective together.
  5. Progress: the last stage waits for nobody downstream, so every chain completes; every
     completion frees a rank, which is matched at once if work is waiting. A request or id left
     for a busy replica does not stall: that replica frees (its chain completes), and a free
     replica is preferred over a busy one whose expected release has passed (start times are
     max(now, release), ties go to the free one), so when every candidate is free one of them
     is matched.
The scheduler itself never blocks: it is a function of events; its cost is a few dict operations
per event (measured per mini-batch in the report).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hpcsrl.pipeline.topology import Layout

WORK, ROUTE, AGGREGATE, STOP = 1, 2, 3, 4
POLICIES = ("dynamic", "fixed")


@dataclass(frozen=True)
class Action:
    kind: int
    rank: int
    mb: int = -1
    peer: int = -1      # WORK: upstream rank (-1: read the data); ROUTE: downstream rank
    round: int = -1     # AGGREGATE / STOP: aggregation round


@dataclass
class _Rank:
    stage: int
    mb: int = -1              # mini-batch held (-1: none)
    phase: str = "joining"    # joining | idle | forward | queued | backward | aggregating
    peer: int = -1            # upstream (forward) or downstream (backward) rank
    done: int = 0             # mini-batches completed
    since: float = 0.0        # when it got its current mini-batch
    hold: float | None = None  # running average of seconds from WORK to free (its chain's time)
    reserved: tuple[int, int] | None = None  # (mb, upstream) routed to it while busy
    busy: float | None = None  # running average of its own compute seconds per mini-batch


@dataclass
class Scheduler:
    layout: Layout
    total: int                  # mini-batch ids run in [first, total)
    aggregate_every: int
    policy: str = "dynamic"
    first: int = 0
    alpha: float = 0.3          # weight of the newest measurement in the running average
    assignment: dict[int, list[int]] = field(default_factory=dict)
    round: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"chains must be one of {', '.join(POLICIES)}")
        self.fixed: FixedChains | None = (FixedChains(self.layout) if self.policy == "fixed"
                                          else None)
        if self.aggregate_every < 1:
            raise ValueError("aggregation interval must be at least 1")
        self.ranks = {r: _Rank(self.layout.stage_of(r)) for r in range(self.layout.size)}
        self.next_mb = self.first
        self.window_end = self.first
        self.waiting: list[deque[int]] = [deque() for _ in range(self.layout.stages)]
        self._open_window()

    # --- events ------------------------------------------------------------------------------
    def free(self, rank: int, done_mb: int = -1, busy_s: float | None = None,
             now: float = 0.0) -> list[Action]:
        st = self.ranks[rank]
        if st.phase not in ("joining", "idle", "aggregating") and st.mb != done_mb:
            raise ValueError(f"rank {rank} reports mini-batch {done_mb} done but holds {st.mb}")
        if done_mb >= 0:
            st.done += 1
            st.hold = self._average(st.hold, now - st.since)
            if busy_s is not None:
                st.busy = self._average(st.busy, busy_s)
        st.mb, st.phase, st.peer = -1, "idle", -1
        return self._dispatch(now)

    def forwarded(self, rank: int, mb: int, now: float = 0.0) -> list[Action]:
        st = self.ranks[rank]
        if st.phase != "forward" or st.mb != mb:
            raise ValueError(f"rank {rank} forwarded mini-batch {mb} it does not hold")
        if st.stage == self.layout.stages - 1:
            raise ValueError(f"rank {rank} is on the last stage: nothing to forward to")
        st.phase = "queued"
        self.waiting[st.stage].append(rank)
        return self._dispatch(now)

    # --- queries -----------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.round < 0

    def counts(self) -> dict[int, int]:
        return {r: st.done for r, st in self.ranks.items()}

    def activity(self, rank: int) -> str:
        """What `rank` is doing, as far as the scheduler knows (for failure messages)."""
        st = self.ranks[rank]
        s, mb = st.stage, st.mb
        if st.phase == "forward":
            if s == 0:
                return f"reading mini-batch {mb} and computing its forward"
            what = "forward and backward" if s == self.layout.stages - 1 else "forward"
            return f"receiving mini-batch {mb} from rank {st.peer} and computing its {what}"
        if st.phase == "queued":
            return f"holding mini-batch {mb}'s activation for a free stage-{s + 1} replica"
        if st.phase == "backward":
            return (f"sending mini-batch {mb}'s activation to rank {st.peer}, waiting for its "
                    "gradient or computing the backward")
        if st.phase == "joining":
            return "starting up (has not reached the scheduler yet)"
        if st.phase == "aggregating":
            return f"averaging stage {s} with its replicas and checkpointing (round {self.round})"
        return "idle, waiting for the scheduler"

    # --- internals ---------------------------------------------------------------------------
    def _open_window(self) -> None:
        self.window_end = min(self.total, self.next_mb + self.aggregate_every)
        if self.fixed is not None:
            self.fixed.open(self.next_mb, self.window_end)

    def _free_ranks(self, stage: int) -> list[int]:
        return [r for r in self.layout.ranks_of(stage) if self.ranks[r].phase == "idle"]

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.alpha * new + (1 - self.alpha) * old

    def _pick(self, stage: int, upstream: int, now: float) -> int | None:
        """The replica to hand `upstream`'s activation to: a free one, a busy one without a
        reservation (dynamic chains: reserved for it), or None (wait)."""
        if self.fixed is not None:
            mb = self.ranks[upstream].mb
            partner = self.fixed.member(mb, stage)
            if self.ranks[partner].phase != "idle" or self.fixed.next(partner) != mb:
                return None
            self.fixed.take(partner, mb)
            return partner
        best = self._first_to_finish(stage, now, {}, skip_reserved=True)
        return None if best is None else best[2]

    def _first_to_finish(self, stage: int, now: float, release: dict[int, float],
                         skip_reserved: bool = False) -> tuple[float, int, int] | None:
        """(expected finish, 0 if free else 1, rank) of the stage's replica expected to finish
        a new mini-batch first: a free one at now + its own compute average, a busy one at its
        expected release + that. `release[r]` overrides a replica's release (ids promised to it
        during one dispatch); `skip_reserved` leaves out replicas already holding a reservation."""
        best: tuple[float, int, int] | None = None
        for r in self.layout.ranks_of(stage):
            st = self.ranks[r]
            if st.phase in ("joining", "aggregating") or (skip_reserved and
                                                          st.reserved is not None):
                continue
            idle = st.phase == "idle" and r not in release
            start = now if idle else max(now, release.get(r, st.since + (st.hold or 0.0)))
            key = (start + (st.busy or 0.0), 0 if idle else 1, r)
            best = key if best is None or key < best else best
        return best

    def _dispatch(self, now: float) -> list[Action]:
        out: list[Action] = []
        n = self.layout.stages
        for r, st in self.ranks.items():  # a freed replica starts what was routed to it
            if st.phase == "idle" and st.reserved is not None:
                (mb, up), st.reserved = st.reserved, None
                st.mb, st.phase, st.peer, st.since = mb, "forward", up, now
                out.append(Action(WORK, r, mb, up))
        for s in range(n - 2, -1, -1):  # hand activations down first: it frees upstream ranks
            queue = self.waiting[s]
            for up in list(queue):
                dst = self._pick(s + 1, up, now)
                if dst is None:
                    continue
                queue.remove(up)
                u, d = self.ranks[up], self.ranks[dst]
                u.phase, u.peer = "backward", dst
                self.assignment[u.mb].append(dst)
                out.append(Action(ROUTE, up, u.mb, dst))
                if d.phase == "idle":
                    d.mb, d.phase, d.peer, d.since = u.mb, "forward", up, now
                    out.append(Action(WORK, dst, u.mb, up))
                else:  # sent now, received the moment dst frees (WORK above, first thing)
                    d.reserved = (u.mb, up)
        if self.round >= 0:
            for r in self._admissions(now):
                mb = self._next_id(r)
                if mb is None:
                    continue
                st = self.ranks[r]
                st.mb, st.phase, st.peer, st.since = mb, "forward", -1, now
                self.assignment[mb] = [r]
                out.append(Action(WORK, r, mb, -1))
        if self.round >= 0 and self.next_mb >= self.window_end and all(
                st.phase == "idle" for st in self.ranks.values()) and self._window_done():
            last = self.next_mb >= self.total
            kind = STOP if last else AGGREGATE
            self.round += 1
            for r, st in self.ranks.items():
                st.phase = "aggregating"
                out.append(Action(kind, r, round=self.round))
            if last:
                self.round = -1
            else:
                self._open_window()
        return out

    def _admissions(self, now: float) -> list[int]:
        """The free stage-0 replicas to hand a new id now.

        Fixed chains: every free one (its chain's ids decide). Dynamic, while the window has
        more ids left than there are stage-0 replicas: every free one (a free replica left idle
        only lowers the rate: each runs at most one mini-batch). For the window's last ids,
        which every rank then waits for before aggregating: each goes, one at a time, to the
        replica expected to finish it first (as `_pick` does for a forward request): a free
        replica at now + its own compute, a busy one at its expected release + that. An id
        whose best replica is busy is promised to it and left for it (issued when that replica
        frees), and the next id is considered; so a slow stage-0 node does not start one of the
        last mini-batches that a fast one would finish sooner."""
        free = self._free_ranks(0)
        left = self.window_end - self.next_mb
        if self.fixed is not None or not free or left > self.layout.replicas[0]:
            return free
        chosen: list[int] = []
        release: dict[int, float] = {}
        while left > 0 and len(chosen) < len(free):
            best = self._first_to_finish(0, now, release)
            if best is None:
                break
            if best[1] == 0:
                chosen.append(best[2])
            release[best[2]] = best[0]  # busy until then for the next id
            left -= 1
        return chosen

    def _window_done(self) -> bool:
        return self.fixed is None or self.fixed.done

    def _next_id(self, rank: int) -> int | None:
        if self.fixed is not None:
            mb = self.fixed.next(rank)
            if mb is None:
                return None
            self.fixed.take(rank, mb)
            self.next_mb = self.window_end if self.fixed.issued else max(self.next_mb, mb + 1)
            return mb
        if self.next_mb >= self.window_end:
            return None
        mb = self.next_mb
        self.next_mb += 1
        return mb


# --- fixed chains on any replica counts (Fig. 4a) -------------------------------------------
class FixedChains:
    """Fixed chains for stages with equal or unequal replica counts.

    There are C = max_s r_s chains; chain c is replica c mod r_s of every stage s (with 3/2/1:
    ranks 0-3-5, 1-4-5, 2-3-5), so every rank is in at least one chain and its neighbours never
    change. Mini-batch id `start + i` of a window belongs to chain i mod C. A replica shared by
    several chains serves them in a fixed round-robin order: it takes its chains' ids strictly
    in increasing order (`queues[rank]`), at every stage.

    Why this cannot deadlock: take the lowest id m not yet finished. Every id a rank of m's
    chain was given before m is lower, so finished, and that rank is free with m at the head
    of its queue; so m's stage-0 rank gets it, each next-stage partner accepts it as soon as it
    is handed down, and m finishes. By induction every id of the window finishes.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.chains = max(layout.replicas)
        self.members = [[layout.rank_of(s, c % r) for s, r in enumerate(layout.replicas)]
                        for c in range(self.chains)]
        self.start = 0
        self.queues: dict[int, deque[int]] = {r: deque() for r in range(layout.size)}

    def chain_of(self, mb: int) -> int:
        return (mb - self.start) % self.chains

    def member(self, mb: int, stage: int) -> int:
        """The stage-`stage` rank of mini-batch `mb`'s chain."""
        return self.members[self.chain_of(mb)][stage]

    def open(self, start: int, end: int) -> None:
        """Ids [start, end) for a new window; every rank's queue must be empty."""
        if any(self.queues.values()):
            raise ValueError("a fixed-chain window opened before the last one finished")
        self.start = start
        for mb in range(start, end):
            for r in self.members[self.chain_of(mb)]:
                self.queues[r].append(mb)

    def next(self, rank: int) -> int | None:
        """The only id `rank` may take next (None: nothing left in this window)."""
        q = self.queues[rank]
        return q[0] if q else None

    def take(self, rank: int, mb: int) -> None:
        if self.next(rank) != mb:
            raise ValueError(f"rank {rank} takes mini-batch {mb} out of its chains' order "
                             f"(next is {self.next(rank)})")
        self.queues[rank].popleft()

    @property
    def issued(self) -> bool:
        """Every id of the window was given to its stage-0 rank."""
        return not any(self.queues[r] for r in self.layout.ranks_of(0))

    @property
    def done(self) -> bool:
        return not any(self.queues.values())
