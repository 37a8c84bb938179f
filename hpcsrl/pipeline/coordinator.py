"""The scheduler over MPI: a thread on rank 0 that turns small messages into `Scheduler` events,
and the client every rank uses to ask it for work; both detect a rank that stops answering.

Messages are 6 int64s `[kind, rank, mb, a, b, c]` on their own communicator, so they never mix
with tensors. A rank has at most one request outstanding and gets exactly one reply to it. While
waiting, ranks send a heartbeat every `heartbeat_s`; the scheduler pings every rank as often. A
rank the scheduler has not heard from for `timeout_s` is declared failed: the scheduler prints one
line naming it, its stage and what it was doing, and tells every other rank to stop; a rank that
hears nothing from the scheduler for `timeout_s` names rank 0. Either way every survivor exits
non-zero (`PeerFailure`), and the last checkpoint (written atomically) stays intact.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from hpcsrl.pipeline.schedule import AGGREGATE, ROUTE, STOP, WORK, Action, Scheduler
from hpcsrl.pipeline.topology import Layout

# request kinds (rank -> scheduler)
FREE, FORWARDED, HEARTBEAT, FAILED = 11, 12, 13, 14
# ping kinds (scheduler -> rank)
PING, ABORT = 21, 22
TAG_REQUEST, TAG_REPLY, TAG_PING = 1, 2, 3
COORDINATOR = 0
# Longest sleeps between polls, which bound the latency they add. Every hand-over crosses the
# scheduler once, wakes an idle rank once and a rank waiting for its gradient once: at 1-2 ms
# each they cost ~3-4 ms per mini-batch and stage (0.6 % of a 620 ms emulated chain per stage).
# At these values a waiting thread costs ~3 % of a core (measured here, against 1.7 % at 2 ms),
# and only while it waits. RANK_POLL_MAX_S also bounds the rank's tensor waits (run.py).
SCHEDULER_POLL_MAX_S = 2e-4
RANK_POLL_MAX_S = 2.5e-4


class PeerFailure(RuntimeError):
    """Another rank failed; the message (already printed once, by whoever detected it) names it."""


def _msg(*values: int) -> np.ndarray:
    out = np.full(6, -1, dtype=np.int64)
    out[:len(values)] = values
    return out


@dataclass
class _Outbox:
    """Non-blocking sends whose buffers must live until they complete."""

    pending: list[tuple[MPI.Request, np.ndarray]] = field(default_factory=list)

    def send(self, comm: MPI.Comm, msg: np.ndarray, dest: int, tag: int) -> None:
        self.pending.append((comm.Isend(msg, dest=dest, tag=tag), msg))
        self.pending = [(r, m) for r, m in self.pending if not r.Test()]


class Coordinator(threading.Thread):
    """Runs `Scheduler` on rank 0 in a background thread (rank 0 also computes a stage)."""

    def __init__(self, comm: MPI.Comm, scheduler: Scheduler, timeout_s: float,
                 heartbeat_s: float) -> None:
        super().__init__(name="dhp-scheduler", daemon=True)
        self.comm, self.sched = comm, scheduler
        self.layout: Layout = scheduler.layout
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.failure: str | None = None
        self.events = 0
        self.busy_s = 0.0  # time spent deciding (the scheduler's overhead)
        self.lock = threading.Lock()  # held while the scheduler changes (rank 0 reads it too)
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug here must not hang the run: report it like a failure
            self.failure = f"the DHP scheduler on rank 0 failed: {type(exc).__name__}: {exc}"
            print(f"hpcsrl dhp: error: {self.failure}", file=sys.stderr, flush=True)
            self._abort_all(-1)

    def _loop(self) -> None:
        out = _Outbox()
        buf = np.zeros(6, dtype=np.int64)
        req = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=TAG_REQUEST)
        heard = {r: self.now() for r in range(self.layout.size)}
        stopped: set[int] = set()
        last_ping = 0.0
        sleep = 20e-6
        while not self._halt.is_set():
            if req.Test():
                kind, rank, mb, a, b, _ = (int(v) for v in buf)
                t0 = time.perf_counter()
                now = self.now()
                heard[rank] = now
                actions: list[Action] = []
                with self.lock:
                    if kind == FREE:
                        actions = self.sched.free(rank, mb, a / 1e6 if a >= 0 else None, now)
                    elif kind == FORWARDED:
                        actions = self.sched.forwarded(rank, mb, now)
                if kind == FAILED:
                    self.failure = f"rank {rank} failed"
                    self._abort_all(rank)
                    return
                for act in actions:
                    out.send(self.comm, _msg(act.kind, act.rank, act.mb, act.peer, act.round),
                             act.rank, TAG_REPLY)
                    if act.kind == STOP:
                        stopped.add(act.rank)
                self.events += 1
                self.busy_s += time.perf_counter() - t0
                req = self.comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=TAG_REQUEST)
                sleep = 20e-6
                continue
            now = self.now()
            if now - last_ping >= self.heartbeat_s:
                last_ping = now
                for r in range(self.layout.size):  # until stop(): ranks still write reports
                    out.send(self.comm, _msg(PING), r, TAG_PING)
                for r, t in heard.items():
                    if r not in stopped and now - t > self.timeout_s:
                        self.failure = (f"{self.layout.describe(r)} stopped answering for "
                                        f"{now - t:.0f} s while {self.sched.activity(r)}")
                        print(f"hpcsrl dhp: error: {self.failure} (--timeout "
                              f"{self.timeout_s:g} s); stopping every rank", file=sys.stderr,
                              flush=True)
                        self._abort_all(r)
                        return
            time.sleep(sleep)
            sleep = min(SCHEDULER_POLL_MAX_S, sleep * 2)
        req.Cancel()

    def _abort_all(self, failed: int) -> None:
        for r in range(self.layout.size):
            if r != failed:
                try:
                    self.comm.Isend(_msg(ABORT, failed), dest=r, tag=TAG_PING)
                except MPI.Exception:
                    pass


class SchedulerClient:
    """A rank's side: one request at a time, heartbeats while waiting, failure checks."""

    def __init__(self, comm: MPI.Comm, rank: int, layout: Layout, timeout_s: float,
                 heartbeat_s: float, coordinator: Coordinator | None = None) -> None:
        self.comm, self.rank, self.layout = comm, rank, layout
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.coordinator = coordinator
        self.out = _Outbox()
        self._ping = np.zeros(6, dtype=np.int64)
        self._ping_req = comm.Irecv(self._ping, source=COORDINATOR, tag=TAG_PING)
        self.last_ping = self.last_beat = time.perf_counter()
        self.wait_s = 0.0

    def check(self, activity: str = "") -> None:
        """Between polls of any wait: read pings, send a heartbeat when due, raise on failure."""
        now = time.perf_counter()
        while self._ping_req.Test():
            kind, failed = int(self._ping[0]), int(self._ping[1])
            if kind == ABORT:
                raise PeerFailure("stopped by the scheduler: "
                                  + (f"{self.layout.describe(failed)} failed" if failed >= 0
                                     else "the scheduler failed"))
            self.last_ping = now
            self._ping_req = self.comm.Irecv(self._ping, source=COORDINATOR, tag=TAG_PING)
        if self.coordinator is not None and self.coordinator.failure:
            raise PeerFailure(self.coordinator.failure)
        if now - self.last_ping > self.timeout_s:
            msg = (f"rank 0 (stage 0, replica 0, the scheduler) stopped answering for "
                   f"{now - self.last_ping:.0f} s; {self.layout.describe(self.rank)} was "
                   f"{activity or 'waiting'}")
            print(f"hpcsrl dhp: error: {msg} (--timeout {self.timeout_s:g} s)",
                  file=sys.stderr, flush=True)
            raise PeerFailure(msg)
        if now - self.last_beat >= self.heartbeat_s:
            self.last_beat = now
            self.out.send(self.comm, _msg(HEARTBEAT, self.rank), COORDINATOR, TAG_REQUEST)

    def request(self, kind: int, mb: int = -1, busy_s: float | None = None) -> Action:
        """Tell the scheduler FREE/FORWARDED and wait (polling) for its one answer."""
        a = -1 if busy_s is None else int(busy_s * 1e6)
        self.out.send(self.comm, _msg(kind, self.rank, mb, a), COORDINATOR, TAG_REQUEST)
        self.last_beat = time.perf_counter()
        reply = np.zeros(6, dtype=np.int64)
        req = self.comm.Irecv(reply, source=COORDINATOR, tag=TAG_REPLY)
        t0 = time.perf_counter()
        sleep = 20e-6
        what = "waiting for the scheduler"
        while not req.Test():
            self.check(what)
            time.sleep(sleep)
            sleep = min(RANK_POLL_MAX_S, sleep * 2)
        self.wait_s += time.perf_counter() - t0
        k, r, m, peer, rnd, _ = (int(v) for v in reply)
        if k not in (WORK, ROUTE, AGGREGATE, STOP):
            raise RuntimeError(f"scheduler sent an unknown action {k}")
        return Action(k, r, m, peer, rnd)

    def close(self) -> None:
        """Withdraw the standing ping receive (before MPI finalises)."""
        self._ping_req.Cancel()

    def fail(self) -> None:
        """Best effort: tell the scheduler this rank is failing (so others stop at once)."""
        try:
            self.comm.Isend(_msg(FAILED, self.rank), dest=COORDINATOR, tag=TAG_REQUEST)
        except MPI.Exception:
            pass
