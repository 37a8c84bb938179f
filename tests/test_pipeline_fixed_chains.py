"""Fixed chains (Fig. 4a) on plans with unequal replicas, as a pure schedule without MPI."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_schedule import check_assignment, paper_times, simulate  # noqa: E402

from hpcsrl.pipeline.schedule import ROUTE, WORK, FixedChains, Scheduler  # noqa: E402
from hpcsrl.pipeline.topology import Layout  # noqa: E402


def test_three_two_one_chains_and_round_robin_order() -> None:
    fc = FixedChains(Layout.of([3, 2, 1]))
    assert fc.members == [[0, 3, 5], [1, 4, 5], [2, 3, 5]]
    fc.open(10, 17)
    assert list(fc.queues[3]) == [10, 12, 13, 15, 16]  # chains 0 and 2 alternate
    assert list(fc.queues[4]) == [11, 14]
    assert list(fc.queues[5]) == list(range(10, 17))
    with pytest.raises(ValueError, match="out of its chains' order"):
        fc.take(3, 12)
    with pytest.raises(ValueError, match="before the last one finished"):
        fc.open(17, 20)


@pytest.mark.parametrize("replicas", [[3, 2, 1], [1, 2, 3], [2, 3, 1], [1, 3], [3, 1, 2, 2]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unequal_fixed_chains_finish_every_id_once_in_order(replicas: list[int],
                                                            seed: int) -> None:
    """Random per-rank times (one rank up to 4x slower) never deadlock: every rank is stopped,
    every id runs once on its fixed chain, and each rank takes its ids in increasing order."""
    layout = Layout.of(replicas)
    rng = random.Random(seed)
    fwd, bwd = paper_times(layout, tuple(rng.uniform(0.2, 1.0) for _ in replicas))
    slow = rng.randrange(layout.size)
    fwd[slow], bwd[slow] = 4 * fwd[slow], 4 * bwd[slow]
    total, k = 37, 10
    sched = Scheduler(layout, total=total, aggregate_every=k, policy="fixed")
    _, log = simulate(sched, fwd, bwd)
    check_assignment(sched, total)
    fc = FixedChains(layout)
    for mb, chain in sched.assignment.items():
        assert chain == fc.members[(mb % k) % fc.chains], mb
    taken: dict[int, list[int]] = {}
    for a in log:
        if a.kind == WORK:
            taken.setdefault(a.rank, []).append(a.mb)
        if a.kind == ROUTE:
            assert a.peer in fc.members[(a.mb % k) % fc.chains]
    for r in range(layout.size):
        assert taken[r] == sorted(taken[r]), r


def test_shared_replica_serves_its_chains_in_turn() -> None:
    layout = Layout.of([3, 2, 1])
    sched = Scheduler(layout, total=30, aggregate_every=30, policy="fixed")
    simulate(sched, *paper_times(layout, (1.0, 1.0, 1.0)))
    counts = sched.counts()
    assert [counts[r] for r in range(6)] == [10, 10, 10, 20, 10, 30]
