"""From a profile and a cluster to the plan.json of issue 4 (search + the metrics of the result)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

from hpcsrl.errors import UserError
from hpcsrl.planning.costs import (
    PS_PER_S,
    Cluster,
    Costs,
    bounds_of,
    imbalance_ratio,
    per_second,
    stage_latency,
    throughput_bound,
    utilization_index,
)
from hpcsrl.planning.profile import Profile
from hpcsrl.planning.search import search_bottleneck, search_throughput, search_utilization

OBJECTIVES = ("utilization", "bottleneck", "throughput")
MAX_LISTED_ALLOCATIONS = 5000


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to give `total` nodes to `parts` stages, each at least one (lexicographic)."""
    for bars in itertools.combinations(range(1, total), parts - 1):
        edges = (0, *bars, total)
        yield tuple(edges[i + 1] - edges[i] for i in range(parts))


def make_plan(profile: Profile, cluster: Cluster, objective: str = "utilization") -> dict[str, Any]:
    """Search the best cuts (and replicas) for `objective` and describe the plan as JSON."""
    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if cluster.in_flight is not None and cluster.in_flight < 1:
        raise UserError("--in-flight must be at least 1")
    costs = Costs(profile, cluster.bandwidth, cluster.latency)
    if costs.total_time == 0:
        raise UserError("--profile: every unit has zero time (a memory-only profile?); "
                        "re-run `hpcsrl profile` with timing")
    budgets, n = list(cluster.budgets), cluster.devices
    if objective == "throughput":
        total = cluster.total_devices if cluster.total_devices is not None else n
        cuts, replicas, _ = search_throughput(costs, budgets, total, cluster.in_flight)
    else:
        if objective == "utilization":
            cuts, _ = search_utilization(costs, budgets)
        else:
            cuts, _ = search_bottleneck(costs, budgets)
        chains = (cluster.total_devices or n) // n
        if chains < 1:
            raise UserError(f"--total-devices {cluster.total_devices} is fewer than --devices {n}")
        replicas = [chains] * n
    return describe(profile, costs, cluster, objective, cuts, replicas)


def describe(profile: Profile, costs: Costs, cluster: Cluster, objective: str,
             cuts: Sequence[int], replicas: Sequence[int]) -> dict[str, Any]:
    """plan.json for given cuts and replicas (also used to report candidates and baselines)."""
    budgets, n = list(cluster.budgets), len(replicas)
    bnd = bounds_of(cuts, costs.q)
    num, den = imbalance_ratio(costs, cuts)
    e = utilization_index(num, den, n)
    stages = []
    for i in range(n):
        a, b = bnd[i], bnd[i + 1]
        stage = {
            "first_unit": a, "last_unit": b - 1,
            "first_name": costs.names[a], "last_name": costs.names[b - 1],
            "compute_s": costs.compute(a, b) / PS_PER_S,
            "transfer_s": costs.edge(a, b) / PS_PER_S,
            "memory_bytes": costs.memory(a, b),
            "device_memory_bytes": budgets[i],
            "replicas": replicas[i],
            "busy_s": stage_latency(costs, bnd, i) / PS_PER_S,
        }
        if cluster.in_flight is not None:
            stage["in_flight"] = costs.in_flight(a, b, budgets[i], cluster.in_flight)
        stages.append(stage)
    bound = throughput_bound(costs, cuts, replicas, budgets, cluster.in_flight)
    t_all = costs.total_time + 2 * sum(costs.cut[c] for c in cuts)
    plan: dict[str, Any] = {
        "objective": objective,
        "cuts": list(cuts),
        # JSON has no infinity: null means perfect balance (E = +inf, D = 0).
        "utilization_index": None if math.isinf(e) else e,
        "bottleneck_s": max(costs.compute(bnd[i], bnd[i + 1]) + costs.edge(bnd[i], bnd[i + 1])
                            for i in range(n)) / PS_PER_S,
        "throughput_bound_per_s": per_second(bound),
        "stages": stages,
        "total_time_s": t_all / PS_PER_S,
        "transfer_total_s": (t_all - costs.total_time) / PS_PER_S,
        "model": profile.model,
        # build_method's shape options (stem, width) for `hpcsrl dhp`; absent: the default shape
        "model_options": dict(profile.extra.get("model_options") or {}),
        "batch_size": profile.batch_size,
        "input_shape": list(profile.input_shape),  # [bands, H, W]: `hpcsrl dhp` checks its data
        "bandwidth_bytes_per_s": cluster.bandwidth,
        "latency_s": cluster.latency,
    }
    if objective == "throughput":
        total = sum(replicas)
        allocs = []
        for reps in itertools.islice(compositions(total, n), MAX_LISTED_ALLOCATIONS):
            b_ = throughput_bound(costs, cuts, reps, budgets, cluster.in_flight)
            allocs.append({"replicas": list(reps), "throughput_bound_per_s": per_second(b_)})
        allocs.sort(key=lambda x: -x["throughput_bound_per_s"])
        plan["total_devices"] = total
        plan["allocations"] = allocs
        if total % n == 0:
            fixed = throughput_bound(costs, cuts, [total // n] * n, budgets, cluster.in_flight)
            plan["fixed_chains_bound_per_s"] = per_second(fixed)
    if cluster.in_flight is not None:
        plan["in_flight"] = cluster.in_flight
    return plan


def candidate_cuts(costs: Costs, budgets: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every memory-feasible cut set (for reports such as Fig. 14; exponential in devices)."""
    n = len(budgets)
    for cuts in itertools.combinations(range(1, costs.q), n - 1):
        bnd = bounds_of(cuts, costs.q)
        if all(costs.memory(bnd[i], bnd[i + 1]) <= budgets[i] for i in range(n)):
            yield cuts
