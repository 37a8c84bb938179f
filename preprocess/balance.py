"""Work assignment of patches to ranks: pure functions over per-scene patch counts.

Three strategies, for comparison and use:
- `round_robin`: scene i to rank i mod N (whole scenes);
- `greedy`: whole scenes, largest first, each to the currently least-loaded rank (the paper's
  tile distribution); cannot balance when one scene is larger than the mean load;
- `split` (default): the global patch order (scene, row-major position) cut into N contiguous
  ranges of floor/ceil(total/N) patches, splitting scenes where needed. Each rank's work is then
  one contiguous piece of the output, so the output order is trivially the same for any N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

STRATEGIES = ("split", "greedy", "round-robin")


class Range(NamedTuple):
    """Patches [start, stop) of one scene, in the scene's row-major patch order."""

    scene: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


Assignment = list[list[Range]]  # per rank, its ranges in global (scene, start) order


def round_robin(counts: Sequence[int], n_ranks: int) -> Assignment:
    """Whole scenes dealt out in scene order: scene i goes to rank i % n_ranks."""
    _check(counts, n_ranks)
    out: Assignment = [[] for _ in range(n_ranks)]
    for i, c in enumerate(counts):
        if c > 0:
            out[i % n_ranks].append(Range(i, 0, c))
    return out


def greedy(counts: Sequence[int], n_ranks: int) -> Assignment:
    """Whole scenes, largest first, each to the least-loaded rank (lowest rank on ties)."""
    _check(counts, n_ranks)
    out: Assignment = [[] for _ in range(n_ranks)]
    load = [0] * n_ranks
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        if counts[i] <= 0:
            continue
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        out[r].append(Range(i, 0, counts[i]))
        load[r] += counts[i]
    return [sorted(ranges) for ranges in out]


def split(counts: Sequence[int], n_ranks: int) -> Assignment:
    """Contiguous cuts of the global patch order: rank r gets global patches
    [r*T//N, (r+1)*T//N), so every load is floor(T/N) or ceil(T/N)."""
    _check(counts, n_ranks)
    total = sum(counts)
    bounds = [r * total // n_ranks for r in range(n_ranks + 1)]
    out: Assignment = [[] for _ in range(n_ranks)]
    offset = 0  # global index of the current scene's first patch
    for i, c in enumerate(counts):
        for r in range(n_ranks):
            lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + c)
            if lo < hi:
                out[r].append(Range(i, lo - offset, hi - offset))
        offset += c
    return out


def assign(counts: Sequence[int], n_ranks: int, strategy: str = "split") -> Assignment:
    """Dispatch by strategy name (one of STRATEGIES)."""
    funcs = {"split": split, "greedy": greedy, "round-robin": round_robin}
    if strategy not in funcs:
        raise ValueError(f"unknown assignment {strategy!r}; choose one of {STRATEGIES}")
    return funcs[strategy](counts, n_ranks)


def loads(assignment: Assignment) -> list[int]:
    """Patches per rank."""
    return [sum(r.size for r in ranges) for ranges in assignment]


def balance(assignment: Assignment) -> float:
    """max/mean patches per rank (1.0 is perfect; 1.0 too when there is no work at all)."""
    per_rank = loads(assignment)
    total = sum(per_rank)
    if total == 0:
        return 1.0
    return max(per_rank) * len(per_rank) / total


def global_order(assignment: Assignment) -> list[tuple[int, int]]:
    """(rank, index in that rank's list) of every range, sorted into the global patch order."""
    keyed = [(rng.scene, rng.start, rank, k) for rank, ranges in enumerate(assignment)
             for k, rng in enumerate(ranges)]
    return [(rank, k) for _, _, rank, k in sorted(keyed)]


def _check(counts: Sequence[int], n_ranks: int) -> None:
    if n_ranks < 1:
        raise ValueError(f"need at least one rank, got {n_ranks}")
    if any(c < 0 for c in counts):
        raise ValueError("patch counts must be >= 0")
