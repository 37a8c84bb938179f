"""The DHP scheduler as a pure state machine, driven by a discrete-event simulation of ranks
(`hpcsrl.pipeline.simulate`, which raises when an invariant breaks)."""

from __future__ import annotations

import pytest

from hpcsrl.pipeline import schedule as schedule_module
from hpcsrl.pipeline.schedule import AGGREGATE, ROUTE, STOP, WORK, Action, Scheduler
from hpcsrl.pipeline.simulate import simulate, simulated_rate
from hpcsrl.pipeline.topology import Layout

__all__ = ["check_assignment", "paper_times", "simulate"]  # test_pipeline_fixed_chains uses them


def check_assignment(sched: Scheduler, total: int) -> None:
    assert sorted(sched.assignment) == list(range(total))
    for mb, chain in sched.assignment.items():
        assert [sched.layout.stage_of(r) for r in chain] == list(range(sched.layout.stages)), mb
    counts = sched.counts()
    for s in range(sched.layout.stages):
        assert sum(counts[r] for r in sched.layout.ranks_of(s)) == total


def paper_times(layout: Layout, stage_s: tuple[float, ...]) -> tuple[dict, dict]:
    fwd = {r: stage_s[layout.stage_of(r)] / 3 for r in range(layout.size)}
    bwd = {r: 2 * stage_s[layout.stage_of(r)] / 3 for r in range(layout.size)}
    return fwd, bwd


def bound(layout: Layout, stage_s: tuple[float, ...]) -> float:
    """min_s r_s / L_s with L_s = own time + all later stages' time (no transfers)."""
    return min(layout.replicas[s] / sum(stage_s[s:]) for s in range(layout.stages))


def test_dynamic_321_uses_every_minibatch_once_and_reaches_the_bound() -> None:
    layout = Layout.of([3, 2, 1])
    times = (1.036, 1.140, 0.922)  # the paper's Table 6 partitions, seconds per iteration
    sched = Scheduler(layout, total=300, aggregate_every=100, policy="dynamic")
    t, log = simulate(sched, *paper_times(layout, times))
    check_assignment(sched, 300)
    assert sum(a.kind == AGGREGATE for a in log) == 2 * layout.size
    assert sum(a.kind == STOP for a in log) == layout.size
    measured = 300 / t
    assert measured >= 0.95 * bound(layout, times)
    # the single last-stage node ran everything; stage 0 and 1 replicas share their stage
    counts = sched.counts()
    assert counts[5] == 300
    assert all(90 <= counts[r] <= 110 for r in (0, 1, 2))


def test_dynamic_beats_fixed_chains() -> None:
    times = (1.036, 1.140, 0.922)
    fixed = Scheduler(Layout.of([2, 2, 2]), total=200, aggregate_every=100, policy="fixed")
    t_fixed, _ = simulate(fixed, *paper_times(fixed.layout, times))
    check_assignment(fixed, 200)
    dyn = Scheduler(Layout.of([3, 2, 1]), total=200, aggregate_every=100, policy="dynamic")
    t_dyn, _ = simulate(dyn, *paper_times(dyn.layout, times))
    assert t_fixed / t_dyn >= 1.42


def test_fixed_chains_keep_their_neighbours_and_split_ids_evenly() -> None:
    layout = Layout.of([2, 2, 2])
    sched = Scheduler(layout, total=40, aggregate_every=10, policy="fixed")
    simulate(sched, *paper_times(layout, (1.0, 1.0, 1.0)))
    check_assignment(sched, 40)
    for mb, chain in sched.assignment.items():
        assert chain in ([0, 2, 4], [1, 3, 5])
        assert chain[0] == mb % 2
    assert set(sched.counts().values()) == {20}


def test_slower_replica_gets_proportionally_less_work() -> None:
    layout = Layout.of([3, 2, 1])
    fwd, bwd = paper_times(layout, (1.0, 1.0, 0.5))
    fwd[3], bwd[3] = 2 * fwd[3], 2 * bwd[3]  # stage-1 replica 0 is twice as slow
    sched = Scheduler(layout, total=300, aggregate_every=100, policy="dynamic")
    simulate(sched, fwd, bwd)
    check_assignment(sched, 300)
    counts = sched.counts()
    assert counts[3] < 0.7 * counts[4]


def test_aggregation_only_with_nothing_in_flight_and_window_sizes() -> None:
    layout = Layout.of([2, 1])
    sched = Scheduler(layout, total=25, aggregate_every=10, policy="dynamic")
    _, log = simulate(sched, *paper_times(layout, (1.0, 0.5)))
    rounds = [a for a in log if a.kind in (AGGREGATE, STOP)]
    assert [a.round for a in rounds] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    # ids issued before each aggregation: 10, 20, then the rest
    issued, seen = [], 0
    for a in log:
        if a.kind == WORK and a.peer == -1:
            seen += 1
        if a.kind == AGGREGATE and a.rank == 0:
            issued.append(seen)
    assert issued == [10, 20]


def test_resume_starts_at_first_id_and_one_stage_runs_alone() -> None:
    sched = Scheduler(Layout.of([1]), total=7, aggregate_every=3, policy="fixed", first=4)
    simulate(sched, {0: 0.1}, {0: 0.2})
    assert sorted(sched.assignment) == [4, 5, 6]
    assert sched.counts() == {0: 3}


def test_activity_is_described() -> None:
    # (fixed chains on unequal replicas are allowed: tests/test_pipeline_fixed_chains.py)
    sched = Scheduler(Layout.of([1, 1]), total=4, aggregate_every=4)
    sched.free(0)
    assert "mini-batch 0" in sched.activity(0)
    assert sched.activity(1).startswith("starting up")
    sched.free(1)
    assert sched.activity(1).startswith("idle")
    with pytest.raises(ValueError):
        sched.forwarded(1, 0)


def test_the_last_ids_of_a_window_go_to_the_replica_that_finishes_them_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout.of([2, 1])
    fwd = {0: 4.0, 1: 1.0, 2: 0.1}  # stage-0 rank 0 is four times slower than rank 1
    bwd = dict(fwd)

    def run() -> tuple[float, dict[int, int]]:
        sched = Scheduler(layout, total=14, aggregate_every=7)
        t, _ = simulate(sched, fwd, bwd)
        check_assignment(sched, 14)
        return t, sched.counts()

    t, counts = run()
    # the slow rank starts only the first id of each window: later it would be the last to
    # finish, and the aggregation waits for it
    assert counts == {0: 2, 1: 12, 2: 14}
    # admitting every free stage-0 replica (as before) ends each window with the slow one
    monkeypatch.setattr(schedule_module.Scheduler, "_admissions",
                        lambda self, now: self._free_ranks(0))
    t_all, counts_all = run()
    assert counts_all[0] > counts[0] and t < 0.85 * t_all


def test_mid_window_every_free_stage0_replica_works() -> None:
    # a slow stage-0 replica still adds its rate while ids are plentiful (one window)
    fast_only, _ = simulated_rate([1, 1], [1.0, 0.1], [1.0, 0.1], 60, 60)
    both, counts = simulated_rate([2, 1], [1.0, 0.1], [1.0, 0.1], 60, 60,
                                  slowdown={0: 3.0})
    assert both > 1.25 * fast_only
    assert 10 <= counts[0] <= 20 and counts[0] + counts[1] == 60


def test_a_busy_replica_is_reserved_and_starts_the_request_when_it_frees() -> None:
    sched = Scheduler(Layout.of([3, 1]), total=6, aggregate_every=6)
    for r in range(4):
        sched.free(r, now=0.0)  # ranks 0-2 get ids 0-2
    assert sched.forwarded(0, 0, now=1.0) == [Action(ROUTE, 0, 0, 3), Action(WORK, 3, 0, 0)]
    # rank 3 is busy: the request is routed at once (the activation goes out now) ...
    assert sched.forwarded(1, 1, now=1.1) == [Action(ROUTE, 1, 1, 3)]
    # ... and a third waits: one reservation per replica
    assert sched.forwarded(2, 2, now=1.2) == []
    # freeing rank 3 starts the reserved mini-batch first; rank 0 gets its gradient and goes on
    acts = sched.free(3, 0, busy_s=2.0, now=3.0)
    assert acts[0] == Action(WORK, 3, 1, 1) and Action(ROUTE, 2, 2, 3) in acts
    assert sched.activity(3).startswith("receiving mini-batch 1 from rank 1")
