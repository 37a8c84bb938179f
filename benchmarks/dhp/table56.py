"""Tables 5-6 of the Lite-SRL paper, emulated: six nodes with the paper's per-partition times,
fixed 2x3 chains against dynamic chains on the planner's 3/2/1, and every other allocation of six
nodes to the three stages against its bound.

    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/table56.py            # ~25 min
    python benchmarks/dhp/table56.py --iterations 100 --sweep-iterations 0   # ~5 min

Writes results/table56_nodes.csv (the paper's rows per node), table56_summary.csv,
table56_allocations.csv and table56.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROFILES,
    RESULTS,
    allocation_plan,
    hop_ms,
    paper_plan,
    per_rank,
    rate_fields,
    read_trace,
    run_dhp,
    write_csv,
)

PAPER = {  # Table 5 (fixed) and Table 6 (dynamic): per node runtime (ms) and iterations
    "fixed": ([1035, 1039, 1145, 1139, 921, 923], [500] * 6, 3572),
    "dynamic": ([1036, 1038, 1037, 1140, 1142, 922], [329, 331, 340, 406, 594, 1000], 2750),
}
TARGET_SPEEDUP, TARGET_OF_BOUND = 1.42, 0.95


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, default=PROFILES / "paper_table5.json")
    p.add_argument("--time-scale", type=float, default=0.1)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--aggregate-every", type=int, default=100)
    p.add_argument("--sweep-iterations", type=int, default=200,
                   help="iterations per allocation in the sweep (0: no sweep)")
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/table56"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--reuse", action="store_true",
                   help="re-derive the tables from the runs already in --runs")
    a = p.parse_args()

    scaled, plan = paper_plan(a.profile, a.time_scale, a.runs)
    picked = [s["replicas"] for s in plan["stages"]]
    fixed_plan = allocation_plan(scaled, plan, [2, 2, 2], a.runs / "plan_2-2-2.json")
    print(f"planner's pick {'/'.join(map(str, picked))}: bound {plan['throughput_bound_per_s']:.3f}"
          f"/s; fixed 2/2/2: {fixed_plan['throughput_bound_per_s']:.3f}/s", flush=True)

    reports = {}
    for mode, path in (("fixed", a.runs / "plan_2-2-2.json"), ("dynamic", a.runs / "plan.json")):
        reports[mode] = run_dhp(path, a.profile, a.runs / mode, a.iterations, chains=mode,
                                aggregate_every=a.aggregate_every, time_scale=a.time_scale,
                                reuse=a.reuse)
    nodes, summary = [], []
    for mode, rep in reports.items():
        paper_ms, paper_it, paper_wall = PAPER[mode]
        for row, pms, pit in zip(per_rank(rep, a.time_scale), paper_ms, paper_it, strict=True):
            nodes.append({"chains": mode, **row, "paper_runtime_ms": pms,
                          "paper_iterations": pit})
        trace = read_trace(a.runs / mode)
        hold = sorted(d[0]["backward_end"] - d[0]["forward_start"] for d in trace.values()
                      if 0 in d)
        summary.append({
            "chains": mode, "replicas": "/".join(map(str, rep["replicas"])),
            "time_scale": a.time_scale, **rate_fields(rep),
            "aggregation_pause_s": round(rep["wall_s"] - rep["between_aggregations_s"], 2),
            "s_per_iteration_paper_scale": round(rep["wall_s"] / rep["iterations"]
                                                 / a.time_scale, 4),
            "wall_1000_paper_scale_s": round(rep["wall_s"] * 1000 / rep["iterations"]
                                             / a.time_scale, 1),
            "paper_wall_1000_s": paper_wall,
            "stage0_hold_median_ms": round(1e3 * hold[len(hold) // 2], 2) if hold else None,
            "stage0_chain_emulated_ms": round(1e3 * a.time_scale * sum(
                u["forward_s"] + u["backward_s"] for u in plan_units(a.profile)), 2),
            **hop_ms(trace, 3),
            "scheduler_ms_per_minibatch": round(rep["scheduler_ms_per_minibatch"], 3),
            "aggregate_s_max": max(r["aggregate_s"] for r in rep["ranks"])})
    f, d = reports["fixed"], reports["dynamic"]
    speedup = d["throughput_per_s"] / f["throughput_per_s"]
    key = "throughput_between_aggregations_per_s"
    for row in summary:
        row["dynamic_over_fixed"] = round(speedup, 4)
        row["dynamic_over_fixed_between_aggregations"] = round(d[key] / f[key], 4)
        row["time_reduction_pct"] = round(100 * (1 - f["throughput_per_s"]
                                                 / d["throughput_per_s"]), 2)
        row["paper_dynamic_over_fixed"] = round(3572 / 2750, 4)
        row["paper_time_reduction_pct"] = 23.0
    write_csv(a.out_dir / "table56_nodes.csv", nodes)
    write_csv(a.out_dir / "table56_summary.csv", summary)
    of_bound = d["throughput_per_s"] / d["bound_per_s"]
    print(f"dynamic / fixed = {speedup:.3f}x (target >= {TARGET_SPEEDUP}, paper 1.30, model "
          f"{plan['throughput_bound_per_s'] / fixed_plan['throughput_bound_per_s']:.2f}); dynamic"
          f" at {of_bound:.3f} of its bound (target >= {TARGET_OF_BOUND})", flush=True)

    sweep = []
    if a.sweep_iterations > 0:
        for alloc in plan["allocations"]:
            reps = alloc["replicas"]
            name = "-".join(map(str, reps))
            path = a.runs / f"plan_{name}.json"
            allocation_plan(scaled, plan, reps, path)
            rep = run_dhp(path, a.profile, a.runs / f"sweep_{name}", a.sweep_iterations,
                          aggregate_every=a.aggregate_every, time_scale=a.time_scale, reuse=a.reuse)
            sweep.append({"replicas": "/".join(map(str, reps)), "chains": "dynamic",
                          **rate_fields(rep), "measured_per_s": round(rep["throughput_per_s"], 4),
                          "planner_pick": int(reps == picked)})
        best = max(sweep, key=lambda r: r["measured_per_s"])
        for r in sweep:
            r["best_measured"] = int(r is best)
        write_csv(a.out_dir / "table56_allocations.csv", sweep)
        print(f"best measured allocation {best['replicas']} "
              f"({'the planner' if best['planner_pick'] else 'NOT the planner'}'s pick)")
    plot(a.out_dir / "table56.png", nodes, sweep)
    return 0


def plan_units(profile: Path) -> list[dict]:
    import json

    return json.loads(profile.read_text())["units"]


def plot(path: Path, nodes: list[dict], sweep: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5),
                           squeeze=False)
    ax0 = ax[0][0]
    w = 0.2
    for i, (mode, col) in enumerate((("fixed", "tab:gray"), ("dynamic", "tab:blue"))):
        rows = [r for r in nodes if r["chains"] == mode]
        xs = [r["node"] + (i - 0.5) * 2 * w for r in rows]
        total = sum(r["iterations"] for r in rows if r["partition"] == 1)
        ax0.bar([x - w / 2 for x in xs], [r["iterations"] / total for r in rows], w, color=col,
                label=f"{mode} (measured)")
        ax0.bar([x + w / 2 for x in xs], [r["paper_iterations"] / 1000 for r in rows], w,
                color=col, alpha=0.4, hatch="//", label=f"{mode} (paper)")
    ax0.set_xlabel("node (fixed: partitions 1,1,2,2,3,3; dynamic: 1,1,1,2,2,3)")
    ax0.set_ylabel("share of the iterations")
    ax0.set_title("Iterations per node (Tables 5-6)")
    ax0.legend(fontsize=8)
    if sweep:
        ax1 = ax[0][1]
        xs = range(len(sweep))
        ax1.bar([x - 0.2 for x in xs], [r["bound_per_s"] for r in sweep], 0.4, color="lightgray",
                label="planner bound")
        ax1.bar([x + 0.2 for x in xs], [r["measured_per_s"] for r in sweep], 0.4,
                color=["tab:red" if r["planner_pick"] else "tab:blue" for r in sweep],
                label="measured (red: planner's pick)")
        ax1.set_xticks(list(xs), [r["replicas"] for r in sweep], rotation=45)
        ax1.set_ylabel("mini-batches / s (emulated time)")
        ax1.set_title("Every allocation of 6 nodes to 3 stages, dynamic chains")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
