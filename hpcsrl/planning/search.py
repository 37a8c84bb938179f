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

from hpcsrl.errors import UserError
from hpcsrl.planning.costs import Costs
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
        largest = max(costs.memory(a, a + 1) for a in range(costs.q))
        devices_text = (f"one unit alone needs {format_bytes(largest)}, so no device count "
                        f"works at {format_bytes(biggest)}")
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


def _lower_bound(qq: int, s: int, n: int, t_lo: int, t_hi: int) -> tuple[int, int]:
    """min over T in [t_lo, t_hi] of D(Q, T) = (nQ - 2ST + T^2)/(nT^2), for any final Q >= qq.

    D is increasing in Q at fixed T, and in u = 1/T a convex parabola with vertex u* = S/(nQ).
    """
    if t_lo * s <= n * qq <= t_hi * s:
        return n * qq - s * s, n * n * qq
    t = t_lo if n * qq < t_lo * s else t_hi
    return n * qq - 2 * s * t + t * t, n * t * t


def search_utilization(costs: Costs, budgets: Sequence[int]) -> tuple[list[int], tuple[int, int]]:
    """Maximise E (minimise D) exactly; returns (cuts, (D numerator, D denominator)).

    D depends on the compute split only through Q = sum T_i^2 and on the cuts through the total
    transfer X (T_all = S + X). For a fixed X, D grows with Q, so per state (k stages done, next
    unit j) one label per distinct X keeps the smallest Q: a DP over (k, j, X). Labels whose
    optimistic bound (smallest completable Q, T_all anywhere in its reachable range) is worse
    than a known plan are dropped, which keeps the label sets small.
    """
    feas = require_feasible(costs, budgets)
    q, n, s = costs.q, len(budgets), costs.total_time
    cut2 = [2 * c for c in costs.cut]
    hi, ok = feas.hi, feas.ok

    # Suffix tables for stages k..n-1 from unit a: min sum of squares, min/max transfer.
    qmin = [[INF] * (q + 1) for _ in range(n + 1)]
    xmin = [[INF] * (q + 1) for _ in range(n + 1)]
    xmax = [[-1] * (q + 1) for _ in range(n + 1)]
    arg = [[-1] * (q + 1) for _ in range(n + 1)]
    qmin[n][q], xmin[n][q], xmax[n][q] = 0, 0, 0
    for k in range(n - 1, -1, -1):
        for a in range(q - 1, -1, -1):
            if not ok[k][a]:
                continue
            here = cut2[a] if a > 0 else 0
            for b in range(a + 1, hi[k][a] + 1):
                if not ok[k + 1][b]:
                    continue
                t = costs.compute(a, b)
                val = t * t + qmin[k + 1][b]
                if val < qmin[k][a]:
                    qmin[k][a], arg[k][a] = val, b
                xmin[k][a] = min(xmin[k][a], here + xmin[k + 1][b])
                xmax[k][a] = max(xmax[k][a], here + xmax[k + 1][b])

    def ratio(cuts: Sequence[int], qq: int) -> tuple[int, int]:
        t_all = s + sum(cut2[c] for c in cuts)
        return n * qq - 2 * s * t_all + t_all * t_all, n * t_all * t_all

    # Incumbent: the plan with the most even compute split (min Q), whatever its transfer.
    cuts0, a = [], 0
    for k in range(n - 1):
        a = arg[k][a]
        cuts0.append(a)
    inc_num, inc_den = ratio(cuts0, int(qmin[0][0]))
    best: tuple[int, int, tuple[int, ...]] | None = None

    labels: list[dict[int, tuple[int, tuple[int, ...]]]] = [{0: (0, ())}] + [{}] * q
    for k in range(n):
        new: list[dict[int, tuple[int, tuple[int, ...]]]] = [{} for _ in range(q + 1)]
        last = k == n - 1
        for j in range(q):
            if not labels[j] or not ok[k][j]:
                continue
            add_x = cut2[j] if j > 0 else 0
            b_range = [q] if last else [b for b in range(j + 1, hi[k][j] + 1) if ok[k + 1][b]]
            if last and hi[k][j] < q:
                continue
            for x0, (q0, cuts) in labels[j].items():
                x = x0 + add_x
                ext = (*cuts, j) if j > 0 else cuts
                for b in b_range:
                    t = costs.compute(j, b)
                    qq = q0 + t * t
                    if last:
                        num, den = ratio(ext, qq)
                        if best is None or num * best[1] < best[0] * den or (
                                num * best[1] == best[0] * den and ext < best[2]):
                            best = (num, den, ext)
                            if num * inc_den < inc_num * den:
                                inc_num, inc_den = num, den
                        continue
                    lb_num, lb_den = _lower_bound(qq + int(qmin[k + 1][b]), s, n,
                                                  s + x + int(xmin[k + 1][b]),
                                                  s + x + int(xmax[k + 1][b]))
                    if lb_num * inc_den > inc_num * lb_den:
                        continue  # cannot reach the incumbent, let alone beat it
                    old = new[b].get(x)
                    if old is None or qq < old[0] or (qq == old[0] and ext < old[1]):
                        new[b][x] = (qq, ext)
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

    # front[k][a][m]: list of (bound, x_r) Pareto-optimal, sorted by bound descending.
    Front = list[tuple[tuple[int, int], int]]
    front: list[list[dict[int, Front]]] = [[{} for _ in range(q + 1)] for _ in range(n + 1)]
    front[n][q][0] = [(inf, 0)]
    for k in range(n - 1, -1, -1):
        rest = n - k - 1  # stages after this one, each needing >= 1 device
        for a in range(q - 1, -1, -1):
            if not ok[k][a]:
                continue
            for m in range(rest + 1, total - k + 1):
                cands: list[tuple[tuple[int, int], int]] = []
                for b in range(a + 1, hi[k][a] + 1):
                    if not ok[k + 1][b] or (rest == 0) != (b == q):
                        continue
                    x_add = cut2[b] if b < q else 0
                    for r in range(1, m - rest + 1):
                        for bound, x_r in front[k + 1][b].get(m - r, ()):
                            x_new = x_r + x_add
                            cands.append((_min_ratio(bound, stage_term(k, a, b, r, x_new)),
                                          x_new))
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
