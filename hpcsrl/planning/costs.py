"""A profile on a cluster as exact integers (picoseconds, bytes); the issue's formulas on a plan.

Times are rounded once to integer picoseconds (far below measurement noise), so every sum, ratio
comparison and tie in the search is exact: no float tolerance decides which plan wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from hpcsrl.errors import UserError
from hpcsrl.planning.profile import MAX_SECONDS, Profile

PS_PER_S = 10**12


def to_ps(seconds: float) -> int:
    return int(round(seconds * PS_PER_S))


def checked_ps(seconds: float, what: str) -> int:
    """Integer picoseconds of a time up to MAX_SECONDS; beyond it, one UserError naming `what`.

    Extreme but finite inputs (a unit of 1e300 s, 1e-300 B/s) would otherwise overflow the
    integer conversion or the search's float bounds.
    """
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise UserError(f"{what} takes {seconds:.3g} s, beyond the {MAX_SECONDS:g} s the "
                        "planner handles; check the profile and the link options")
    return to_ps(seconds)


@dataclass(frozen=True)
class Cluster:
    """What the plan runs on: one memory budget per stage, one link model, optional replicas."""

    budgets: tuple[int, ...]          # bytes, one per stage (device) in stage order
    bandwidth: float                  # bytes per second
    latency: float = 0.0              # seconds per message
    total_devices: int | None = None  # M for the throughput objective (replicas per stage)
    in_flight: int | None = None      # k mini-batches a node may hold (None: the plain bound)

    @property
    def devices(self) -> int:
        return len(self.budgets)


class Costs:
    """Prefix sums over units so any contiguous stage's time and memory cost O(1)."""

    def __init__(self, profile: Profile, bandwidth: float, latency: float = 0.0) -> None:
        units = profile.units
        self.q = len(units)
        self.names = [u.name for u in units]
        if not bandwidth > 0:
            raise UserError("--bandwidth must be positive")
        if not 0 <= latency <= MAX_SECONDS:
            raise UserError(f"--latency {latency:.3g} s: give a latency in [0, {MAX_SECONDS:g}] s")
        self.unit_time = [checked_ps(u.forward_s, f"--profile: units[{i}] ({u.name}) forward")
                          + checked_ps(u.backward_s, f"--profile: units[{i}] ({u.name}) backward")
                          for i, u in enumerate(units)]
        self._time = _prefix(self.unit_time)
        self._static = _prefix([u.param_bytes + u.state_bytes for u in units])
        self._act = _prefix([u.activation_bytes for u in units])
        # cut[c]: one-way message time over cut c (between unit c-1 and unit c), c in 1..q-1.
        self.cut = [0] + [checked_ps(units[c - 1].output_bytes / bandwidth + latency,
                                     f"at --bandwidth {bandwidth:.3g} B/s, sending the "
                                     f"{units[c - 1].output_bytes} B output of units[{c - 1}] "
                                     f"({units[c - 1].name})")
                          for c in range(1, self.q)]

    @property
    def total_time(self) -> int:
        return self._time[-1]

    def compute(self, a: int, b: int) -> int:
        """Forward + backward time of units a..b-1."""
        return self._time[b] - self._time[a]

    def static(self, a: int, b: int) -> int:
        """Parameter + gradient/optimizer-state bytes of units a..b-1."""
        return self._static[b] - self._static[a]

    def activation(self, a: int, b: int) -> int:
        return self._act[b] - self._act[a]

    def memory(self, a: int, b: int) -> int:
        return self.static(a, b) + self.activation(a, b)

    def edge(self, a: int, b: int) -> int:
        """X_i of a stage a..b-1: one message over each cut it touches."""
        return (self.cut[a] if a > 0 else 0) + (self.cut[b] if b < self.q else 0)

    def in_flight(self, a: int, b: int, budget: int, k: int) -> int:
        """Mini-batches (<= k) the stage can hold at once within its budget (>= 1 if it fits)."""
        act = self.activation(a, b)
        if act == 0:
            return k
        return max(0, min(k, (budget - self.static(a, b)) // act))


def _prefix(values: Sequence[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def bounds_of(cuts: Sequence[int], q: int) -> list[int]:
    """Stage boundaries [0, c_1, ..., c_{n-1}, q]."""
    return [0, *cuts, q]


def imbalance_ratio(costs: Costs, cuts: Sequence[int]) -> tuple[int, int]:
    """D = sum_i (T_i/T_all - 1/n)^2 as an exact (numerator, denominator); E = -ln(D/n).

    With S = sum T_i, X = T_all - S and W = sum_i (n T_i - S)^2:
    D = (W + n X^2) / (n^2 T_all^2), a sum of non-negative terms (no cancellation).
    """
    b = bounds_of(cuts, costs.q)
    n = len(b) - 1
    t = [costs.compute(b[i], b[i + 1]) for i in range(n)]
    s = sum(t)
    x = 2 * sum(costs.cut[c] for c in cuts)
    return sum((n * ti - s) ** 2 for ti in t) + n * x * x, n * n * (s + x) ** 2


def utilization_index(num: int, den: int, n: int) -> float:
    """E = -ln(D/n) from D = num/den; +inf at perfect balance (D = 0)."""
    if num <= 0:
        return math.inf
    return math.log(den * n) - math.log(num)


def stage_latency(costs: Costs, bnd: Sequence[int], i: int) -> int:
    """L_i: a stage-i node is busy from its forward until its own backward ends."""
    return costs.compute(bnd[i], costs.q) + 2 * sum(costs.cut[c] for c in bnd[i + 1:-1])


def rate(num: int, den: int) -> Fraction | float:
    """num/den mini-batches per picosecond, +inf when den is 0."""
    return math.inf if den == 0 else Fraction(num, den)


def stage_bound(costs: Costs, cuts: Sequence[int], replicas: Sequence[int],
                budgets: Sequence[int], in_flight: int | None, i: int) -> Fraction | float:
    """Stage i's term of the throughput bound, in mini-batches per picosecond."""
    bnd = bounds_of(cuts, costs.q)
    a, b, r = bnd[i], bnd[i + 1], replicas[i]
    term = rate(r, stage_latency(costs, bnd, i))
    if in_flight is not None:
        k = costs.in_flight(a, b, budgets[i], in_flight)
        term = min(term * k, rate(r, costs.compute(a, b) + costs.edge(a, b)))
    return term


def throughput_bound(costs: Costs, cuts: Sequence[int], replicas: Sequence[int],
                     budgets: Sequence[int], in_flight: int | None) -> Fraction | float:
    """min_i r_i/L_i, or with k in flight min_i min(k_i r_i/L_i, r_i/(T_i+X_i)); per picosecond."""
    return min(stage_bound(costs, cuts, replicas, budgets, in_flight, i)
               for i in range(len(replicas)))


def per_second(bound_per_ps: Fraction | float) -> float:
    return math.inf if bound_per_ps == math.inf else float(bound_per_ps * PS_PER_S)
