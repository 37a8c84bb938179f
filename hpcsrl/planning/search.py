"""Exact CWB searches over contiguous cut sets: utilisation index, bottleneck, throughput.

All three are exact on the integer model of `costs` (brute force over every cut set is only the
test oracle). Ties: utilisation and bottleneck return the lexicographically smallest cut list
among optimal plans; throughput the lexicographically smallest (c_1, r_1, c_2, r_2, ..., r_n)
(earlier cuts first, then fewer replicas on earlier stages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from hpcsrl.errors import UserError
from hpcsrl.planning.costs import Costs, stage_bound, throughput_bound
from hpcsrl.planning.quantities import format_bytes

INF = math.inf


@dataclass(frozen=True)
class Feasibility:
    """Memory balancing: which stages fit their device (`hi`) and which suffixes can be covered."""

    hi: list[list[int]]     # hi[k][a]: largest b with units a..b-1 fitting budget k (a if none)
    ok: list[list[bool]]    # ok[k][a]: stages k..n-1 can cover units a..q-1 within budgets


def memory_feasibility(costs: Costs, budgets: Sequence[int]) -> Feasibility:
    q, n = costs.q, len(budgets)
    hi = []
    for k in range(n):
        row, b = [], 0
        for a in range(q + 1):
            b = max(b, a)
            while b < q and costs.memory(a, b + 1) <= budgets[k]:
                b += 1
            row.append(b)
        hi.append(row)
    ok = [[False] * (q + 1) for _ in range(n + 1)]
    ok[n][q] = True
    for k in range(n - 1, -1, -1):
        # stage k covers a..b-1 for some b in (a, hi[k][a]] with ok[k+1][b]
        nxt = ok[k + 1]
        for a in range(q - 1, -1, -1):
            ok[k][a] = any(nxt[b] for b in range(a + 1, hi[k][a] + 1))
    return Feasibility(hi, ok)


def min_stages(costs: Costs, budget: int) -> int | None:
    """Fewest contiguous stages that each fit `budget` (greedy is optimal); None if a unit can't."""
    count, a = 0, 0
    while a < costs.q:
        b = a
        while b < costs.q and costs.memory(a, b + 1) <= budget:
            b += 1
        if b == a:
            return None
        count, a = count + 1, b
    return count


def min_max_memory(costs: Costs, n: int) -> int:
    """Smallest per-device budget that fits the model on n devices (min over cuts of max stage)."""
    q = costs.q
    best = [[INF] * (q + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for b in range(k, q + 1):
            best[k][b] = min((max(best[k - 1][a], costs.memory(a, b)) for a in range(k - 1, b)),
                             default=INF)
    return int(best[n][q])


def require_feasible(costs: Costs, budgets: Sequence[int]) -> Feasibility:
    """Memory balancing; if no cut set fits, one UserError naming what would work."""
    n = len(budgets)
    if n < 1:
        raise UserError("--devices must be at least 1")
    if n > costs.q:
        raise UserError(f"--devices {n}: the profile has only {costs.q} units, so at most "
                        f"{costs.q} stages; use --devices {costs.q} or fewer")
    feas = memory_feasibility(costs, budgets)
    if feas.ok[0][0]:
        return feas
    total = costs.memory(0, costs.q)
    need_budget = min_max_memory(costs, n)
    biggest = max(budgets)
    need_devices = min_stages(costs, biggest)
    budget_text = (format_bytes(budgets[0]) if len(set(budgets)) == 1
                   else "the budgets " + ",".join(format_bytes(b) for b in budgets))
    if need_devices is None:
        too_big = [a for a in range(costs.q) if costs.memory(a, a + 1) > biggest]
        largest = max(too_big, key=lambda a: costs.memory(a, a + 1))
        name, need = f"unit {largest} ({costs.names[largest]})", format_bytes(
            costs.memory(largest, largest + 1))
        unit_text = (f"{name} alone needs {need}" if len(too_big) == 1 else
                     f"{len(too_big)} units are too big alone, the largest {name} with {need}")
        devices_text = f"{unit_text}, so no device count works at {format_bytes(biggest)}"
    else:
        devices_text = f"use --devices {need_devices} or more at {format_bytes(biggest)} each"
    raise UserError(
        f"no partition of the {costs.q} units ({format_bytes(total)} of training memory) into "
        f"{n} stages fits {budget_text}: {devices_text}, or give each of the {n} devices at least "
        f"--memory {need_budget}B ({format_bytes(need_budget)})")


# --------------------------------------------------------------------------- bottleneck


def search_bottleneck(costs: Costs, budgets: Sequence[int]) -> tuple[list[int], int]:
    """Minimise max_i (T_i + X_i) by a min-max DP over suffixes, then the smallest optimal cuts."""
    feas = require_feasible(costs, budgets)
    q, n = costs.q, len(budgets)
    g = [[INF] * (q + 1) for _ in range(n + 1)]  # g[k][a]: best max over stages k.. from unit a
    g[n][q] = 0
    for k in range(n - 1, -1, -1):
        for a in range(q - 1, -1, -1):
            if not feas.ok[k][a]:
                continue
            g[k][a] = min(max(costs.compute(a, b) + costs.edge(a, b), g[k + 1][b])
                          for b in range(a + 1, feas.hi[k][a] + 1) if feas.ok[k + 1][b])
    best = g[0][0]
    cuts, a = [], 0
    for k in range(n - 1):
        a = next(b for b in range(a + 1, feas.hi[k][a] + 1)
                 if feas.ok[k + 1][b] and g[k + 1][b] <= best
                 and costs.compute(a, b) + costs.edge(a, b) <= best)
        cuts.append(a)
    return cuts, int(best)


# --------------------------------------------------------------------------- utilisation


GRID = 512  # buckets of the transfer axis in the utilisation bound tables


def _min_index(w: np.ndarray, s: int, n: int, x_lo: np.ndarray, x_hi: np.ndarray) -> float:
    """Smallest D = (W + n X^2) / (n^2 (S + X)^2) over X in [x_lo, x_hi], per bucket, minimised.

    At fixed X, D grows with W; in X it falls until X* = W/(nS) and rises after, so each bucket's
    minimum sits at X* clamped into its interval. All terms are positive: no cancellation.
    """
    x = np.clip(w / (n * s), x_lo, x_hi)
    return float(np.min((w + n * x * x) / (n * n * (s + x) ** 2)))


def search_utilization(costs: Costs, budgets: Sequence[int]) -> tuple[list[int], tuple[int, int]]:
    """Maximise E (minimise D) exactly; returns (cuts, (D numerator, D denominator)).

    With S = sum T_i, X the total transfer and W = sum_i (n T_i - S)^2 (additive over stages),
    D = sum_i (T_i/T_all - 1/n)^2 = (W + n X^2) / (n^2 (S + X)^2): for a fixed X it grows with W.
    So per state (k stages done, next unit j) one label per distinct X with the smallest W is
    enough: a DP over (k, j, X) in exact integers. To keep it small, a label is dropped when a
    lower bound on every completion's D is worse than a known plan. The bound uses suffix tables
    of the smallest W per bucket of transfer (X rounded down to a grid, so each bucket's true X
    range is known); the same tables give a near-optimal starting plan.
    """
    feas = require_feasible(costs, budgets)
    q, n, s = costs.q, len(budgets), costs.total_time
    cut2 = [2 * c for c in costs.cut]
    hi, ok = feas.hi, feas.ok

    def w_of(a: int, b: int) -> int:
        d = n * costs.compute(a, b) - s
        return d * d

    # Grid for the transfer axis: every suffix's X lies in [g*delta, (g + cuts)*delta].
    x_top = sum(sorted(cut2)[-(n - 1):]) if n > 1 else 0
    delta = max(1, -(-x_top // GRID))
    fl = [c // delta for c in cut2]
    size = x_top // delta + 2
    inf = np.full(size, np.inf)
    table: list[dict[int, np.ndarray]] = [{} for _ in range(n + 1)]
    arg: list[dict[int, np.ndarray]] = [{} for _ in range(n + 1)]
    table[n][q] = inf.copy()
    table[n][q][0] = 0.0
    for k in range(n - 1, -1, -1):
        for a in range(q - 1, -1, -1):
            if not ok[k][a] or (k == 0) != (a == 0):
                continue
            bs = [b for b in range(a + 1, hi[k][a] + 1) if ok[k + 1][b]]
            stack = np.stack([table[k + 1][b] + float(w_of(a, b)) for b in bs])
            pick = np.argmin(stack, axis=0)
            acc = stack[pick, np.arange(size)]
            shift = fl[a] if a > 0 else 0
            row = inf.copy()
            if shift < size:
                row[shift:] = acc[:size - shift]
            table[k][a] = row
            arg[k][a] = np.asarray(bs)[pick]

    def exact(cuts: Sequence[int], w: int) -> tuple[int, int]:
        x = sum(cut2[c] for c in cuts)
        return w + n * x * x, n * n * (s + x) ** 2

    # Starting plan: the smallest-W plan of every transfer bucket, evaluated exactly.
    inc: tuple[int, int] | None = None
    for g in np.flatnonzero(np.isfinite(table[0][0])):
        cuts, a, gg, w = [], 0, int(g), 0
        for k in range(n):
            gg -= fl[a] if a > 0 else 0
            b = int(arg[k][a][gg])
            w += w_of(a, b)
            if b < q:
                cuts.append(b)
            a = b
        cand = exact(cuts, w)
        if inc is None or cand[0] * inc[1] < inc[0] * cand[1]:
            inc = cand
    assert inc is not None, "feasible problem must have a plan"
    inc_f = inc[0] / inc[1] * (1 + 1e-9)  # float slack: never drop a plan tying the incumbent

    # Bucket intervals per suffix state: X of the suffix from (k, b) in [g*delta, (g+m)*delta].
    grid = np.arange(size, dtype=float) * delta

    best: tuple[int, int, tuple[int, ...]] | None = None
    labels: dict[int, dict[int, tuple[int, tuple[int, ...]]]] = {0: {0: (0, ())}}
    for k in range(n):
        new: dict[int, dict[int, tuple[int, tuple[int, ...]]]] = {}
        last = k == n - 1
        m = n - k - 1  # cuts in a suffix starting after this stage
        for j, here in sorted(labels.items()):
            add_x = cut2[j] if j > 0 else 0
            bs = [q] if last else [b for b in range(j + 1, hi[k][j] + 1) if ok[k + 1][b]]
            if last and hi[k][j] < q:
                continue
            for x0, (w0, cuts) in here.items():
                x = x0 + add_x
                ext = (*cuts, j) if j > 0 else cuts
                for b in bs:
                    w = w0 + w_of(j, b)
                    if last:
                        num, den = exact(ext, w)
                        if best is None or num * best[1] < best[0] * den or (
                                num * best[1] == best[0] * den and ext < best[2]):
                            best = (num, den, ext)
                        continue
                    rest = table[k + 1][b]
                    lb = _min_index(w + rest, s, n, x + grid, x + grid + m * delta)
                    if lb > inc_f:
                        continue  # no completion can reach the incumbent, let alone beat it
                    slot = new.setdefault(b, {})
                    old = slot.get(x)
                    if old is None or w < old[0] or (w == old[0] and ext < old[1]):
                        slot[x] = (w, ext)
        labels = new
    assert best is not None, "feasible problem must yield a plan"
    return list(best[2]), (best[0], best[1])


# --------------------------------------------------------------------------- throughput


def _less(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """a < b for non-negative ratios (num, den); den 0 means +inf."""
    return a[0] * b[1] < b[0] * a[1]


def _min_ratio(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return b if _less(b, a) else a


def search_throughput(costs: Costs, budgets: Sequence[int], total: int,
                      in_flight: int | None = None
                      ) -> tuple[list[int], list[int], tuple[int, int]]:
    """Choose cuts and replicas (sum = total) maximising the throughput bound, exactly.

    Stage i's term is r_i / L_i where L_i = compute from its first unit to the end plus the
    round trips of the cuts to its right; that tail of transfers X_r is all an earlier stage
    needs to know of a suffix. So per state (stage k starts at unit a with m devices left) keep
    the Pareto front of suffix plans over (bound higher, X_r lower); then rebuild the
    tie-break-smallest optimal plan greedily, asking the fronts whether a completion exists.
    """
    feas = require_feasible(costs, budgets)
    q, n = costs.q, len(budgets)
    if total < n:
        raise UserError(f"--total-devices {total} is fewer than --devices {n}: every stage needs "
                        f"at least one node; use --total-devices {n} or more")
    hi, ok = feas.hi, feas.ok
    cut2 = [2 * c for c in costs.cut]
    tail = [costs.compute(a, q) for a in range(q + 1)]
    inf = (1, 0)

    def stage_term(k: int, a: int, b: int, r: int, x_r: int) -> tuple[int, int]:
        term = (r, tail[a] + x_r)
        if in_flight is not None:
            kk = costs.in_flight(a, b, budgets[k], in_flight)
            term = _min_ratio((kk * r, tail[a] + x_r), (r, costs.compute(a, b) + costs.edge(a, b)))
        return term

    # A known plan: the bottleneck-optimal cuts with their best replicas. Suffix plans that
    # cannot reach its bound are dropped below (ties are kept, so no optimum is lost).
    cuts0, _ = search_bottleneck(costs, budgets)
    reps0 = best_replicas(costs, cuts0, budgets, total, in_flight)
    known = _as_ratio(throughput_bound(costs, cuts0, reps0, budgets, in_flight))
    k_max = in_flight or 1

    # front[k][a][m]: list of (bound, x_r) Pareto-optimal, sorted by bound descending.
    Front = list[tuple[tuple[int, int], int]]
    front: list[list[dict[int, Front]]] = [[{} for _ in range(q + 1)] for _ in range(n + 1)]
    front[n][q][0] = [(inf, 0)]
    for k in range(n - 1, -1, -1):
        rest = n - k - 1  # stages after this one, each needing >= 1 device
        for a in range(q - 1, -1, -1):
            if not ok[k][a] or (k == 0) != (a == 0):
                continue
            for m in range(rest + 1, total - k + 1):
                cands: list[tuple[tuple[int, int], int]] = []
                for b in range(a + 1, hi[k][a] + 1):
                    if not ok[k + 1][b] or (rest == 0) != (b == q):
                        continue
                    x_add = cut2[b] if b < q else 0
                    for r in range(1, m - rest + 1):
                        for bound, x_r in front[k + 1][b].get(m - r, ()):
                            if _less(bound, known):
                                break  # sorted by bound: the rest are lower still
                            x_new = x_r + x_add
                            val = _min_ratio(bound, stage_term(k, a, b, r, x_new))
                            if k > 0:
                                # the k earlier stages share total - m nodes and each has
                                # L >= tail[a] + cut2[a] + x_new: min r_i/L_i <= mediant
                                val = _min_ratio(val, (k_max * (total - m),
                                                       k * (tail[a] + cut2[a] + x_new)))
                            if not _less(val, known):
                                cands.append((val, x_new))
                front[k][a][m] = _pareto(cands)
    top = front[0][0].get(total)
    assert top, "feasible problem must yield a plan"
    best = top[0][0]

    # Greedy rebuild: smallest (cut, replicas) stage by stage that still reaches `best`.
    cuts: list[int] = []
    reps: list[int] = []
    pre: list[tuple[int, int, int, int]] = []  # prefix stages: (k, a, b, r); L grows with x_r
    a, m = 0, total
    for k in range(n):
        rest = n - k - 1
        found = False
        for b in range(a + 1, hi[k][a] + 1):
            if not ok[k + 1][b] or (rest == 0) != (b == q):
                continue
            x_add = cut2[b] if b < q else 0
            for r in range(1, m - rest + 1):
                for bound, x_r in reversed(front[k + 1][b].get(m - r, ())):
                    if _less(bound, best):
                        continue
                    # smallest x_r with bound >= best (front sorted by bound desc, x_r desc)
                    x_here = x_r + x_add
                    if _less(stage_term(k, a, b, r, x_here), best):
                        break
                    if all(not _less(stage_term(pk, pa, pb, pr,
                                                x_here + sum(cut2[c] for c in cuts[i:])), best)
                           for i, (pk, pa, pb, pr) in enumerate(pre)):
                        found = True
                    break
                if found:
                    pre.append((k, a, b, r))
                    reps.append(r)
                    if b < q:
                        cuts.append(b)
                    a, m = b, m - r
                    break
            if found:
                break
        assert found, "greedy rebuild must follow an optimal plan"
    return cuts, reps, best


def best_replicas(costs: Costs, cuts: Sequence[int], budgets: Sequence[int], total: int,
                  in_flight: int | None = None) -> list[int]:
    """Optimal replicas for fixed cuts: give each extra node to the currently limiting stage.

    Every stage's term grows with its own replicas only, so this greedy maximises the minimum.
    """
    n = len(cuts) + 1
    reps = [1] * n
    for _ in range(total - n):
        terms = [stage_bound(costs, cuts, reps, budgets, in_flight, i) for i in range(n)]
        reps[terms.index(min(terms))] += 1
    return reps


def _as_ratio(value: Fraction | float) -> tuple[int, int]:
    if value == math.inf:
        return (1, 0)
    return (value.numerator, value.denominator)


def _pareto(cands: list[tuple[tuple[int, int], int]]) -> list[tuple[tuple[int, int], int]]:
    """Keep (bound, x) pairs not dominated by a higher-or-equal bound with lower-or-equal x."""
    import functools

    def cmp(u: tuple[tuple[int, int], int], v: tuple[tuple[int, int], int]) -> int:
        if _less(v[0], u[0]):
            return -1
        if _less(u[0], v[0]):
            return 1
        return (u[1] > v[1]) - (u[1] < v[1])

    out: list[tuple[tuple[int, int], int]] = []
    best_x = None
    for c in sorted(cands, key=functools.cmp_to_key(cmp)):
        if best_x is None or c[1] < best_x:
            out.append(c)
            best_x = c[1]
    return out
