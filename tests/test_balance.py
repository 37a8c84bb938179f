"""Assignment strategies: exact expected assignments, coverage, and the split balance bound."""

from __future__ import annotations

import math
import random

import pytest

from preprocess.balance import (
    Range,
    assign,
    balance,
    global_order,
    greedy,
    loads,
    round_robin,
    split,
)


def covered(assignment, counts):
    """Every patch of every scene exactly once."""
    seen = {i: [0] * c for i, c in enumerate(counts)}
    for ranges in assignment:
        for r in ranges:
            for p in range(r.start, r.stop):
                seen[r.scene][p] += 1
    return all(v == 1 for per in seen.values() for v in per)


def test_round_robin_exact():
    assert round_robin([5, 1, 3, 2], 3) == [[Range(0, 0, 5), Range(3, 0, 2)], [Range(1, 0, 1)],
                                            [Range(2, 0, 3)]]


def test_greedy_largest_first_to_least_loaded():
    # sizes 9, 5, 4 go to r0, r1, r2; then 3 -> r2 (load 4), then 1 -> r1 (load 5 < 7)
    a = greedy([3, 9, 1, 5, 4], 3)
    assert a == [[Range(1, 0, 9)], [Range(2, 0, 1), Range(3, 0, 5)], [Range(0, 0, 3),
                                                                      Range(4, 0, 4)]]
    assert loads(a) == [9, 6, 7]


def test_split_exact_cuts_scenes():
    a = split([5, 1, 3, 2], 3)  # total 11: bounds 0, 3, 7, 11
    assert a == [[Range(0, 0, 3)], [Range(0, 3, 5), Range(1, 0, 1), Range(2, 0, 1)],
                 [Range(2, 1, 3), Range(3, 0, 2)]]
    assert loads(a) == [3, 4, 4]


@pytest.mark.parametrize("strategy", ["split", "greedy", "round-robin"])
def test_every_patch_exactly_once(strategy):
    rng = random.Random(1)
    for _ in range(50):
        counts = [rng.choice([0, 1, 2, 7, 40, 300]) for _ in range(rng.randint(0, 12))]
        n = rng.randint(1, 9)
        a = assign(counts, n, strategy)
        assert len(a) == n and covered(a, counts)
        order = global_order(a)
        flat = [(a[r][k].scene, a[r][k].start) for r, k in order]
        assert flat == sorted(flat) and len(flat) == sum(len(x) for x in a)


def test_split_loads_are_floor_or_ceil_and_within_two_percent_on_skewed_sets():
    rng = random.Random(7)
    for _ in range(50):
        counts = [int(rng.paretovariate(1.2) * 50) for _ in range(rng.randint(1, 30))]
        for n in (1, 2, 3, 4, 8, 16):
            per = loads(split(counts, n))
            total = sum(counts)
            assert set(per) <= {total // n, math.ceil(total / n)}
            if total >= 50 * n:
                assert balance(split(counts, n)) <= 1.02


def test_whole_scene_strategies_cannot_balance_one_giant_scene():
    counts = [1000, 10, 10, 10]
    assert balance(greedy(counts, 4)) == pytest.approx(1000 * 4 / 1030)
    assert balance(round_robin(counts, 4)) == balance(greedy(counts, 4))
    assert balance(split(counts, 4)) <= 1.01


def test_balance_edge_cases_and_errors():
    assert balance(split([], 3)) == 1.0
    assert loads(split([2], 4)) == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        assign([1], 0)
    with pytest.raises(ValueError):
        assign([1], 2, "random")
