"""A heterogeneous cluster, emulated: one of six nodes (a partition-1 node, rank 1) 1.5x and 2x
slower, fixed 2x3 chains against dynamic 3/2/1, with the paper's per-node times.

    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/hetero.py     # ~12 min

Model (one mini-batch per node, as the planner's bound): a node is held for its own forward and
backward plus everything downstream, L; a stage serves sum over its nodes of 1/L; throughput is
the smallest stage's. The slow node's L grows by (F-1) x its own time. Fixed chains get equal
shares of every aggregation window, so the slow node's chain paces both; dynamic chains lose
only the slow node's capacity in its stage, at most its share of the stage's work:
(1/3) x (1 - L/L') here. Writes results/hetero.csv and
hetero.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROFILES,
    RESULTS,
    allocation_plan,
    paper_plan,
    per_rank,
    rate_fields,
    run_dhp,
    write_csv,
)

from hpcsrl.pipeline.simulate import simulated_rate  # noqa: E402


def model_rate(times: list[float], replicas: list[int], slow: int, factor: float,
               fixed: bool) -> float:
    """Throughput of the one-mini-batch-per-node model with rank `slow` `factor` times slower
    (downstream nodes taken at their nominal times)."""
    stage_of = [s for s, r in enumerate(replicas) for _ in range(r)]
    extra = [(factor - 1) * times[stage_of[r]] if r == slow else 0.0
             for r in range(len(stage_of))]
    if fixed:  # chain k = replica k of every stage, one mini-batch at a time through all of
        # it; every chain gets the same number of ids per aggregation window, so the slowest
        # chain paces them all
        first = [sum(replicas[:s]) for s in range(len(replicas))]
        return replicas[0] * min(
            1 / (sum(times) + sum(extra[first[s] + k] for s in range(len(times))))
            for k in range(replicas[0]))
    return min(sum(1 / (sum(times[s:]) + extra[r]) for r in range(len(stage_of))
                   if stage_of[r] == s) for s in range(len(replicas)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, default=PROFILES / "paper_table5.json")
    p.add_argument("--time-scale", type=float, default=0.1)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--aggregate-every", type=int, default=100)
    p.add_argument("--slow-rank", type=int, default=1)
    p.add_argument("--factors", default="1,1.5,2")
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/hetero"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--reuse", action="store_true",
                   help="re-derive the tables from the runs already in --runs")
    a = p.parse_args()

    scaled, plan = paper_plan(a.profile, a.time_scale, a.runs)
    allocation_plan(scaled, plan, [2, 2, 2], a.runs / "plan_2-2-2.json")
    units = json.loads(scaled.read_text())["units"]
    times = [u["forward_s"] + u["backward_s"] for u in units]
    fwd, bwd = [u["forward_s"] for u in units], [u["backward_s"] for u in units]
    rows, base = [], {}
    for factor in (float(f) for f in a.factors.split(",")):
        for mode, path, reps in (("fixed", "plan_2-2-2.json", [2, 2, 2]),
                                 ("dynamic", "plan.json", [3, 2, 1])):
            slow = {a.slow_rank: factor} if factor != 1 else {}
            rep = run_dhp(a.runs / path, a.profile, a.runs / f"{mode}_x{factor:g}",
                          a.iterations, chains=mode, aggregate_every=a.aggregate_every,
                          time_scale=a.time_scale, slowdown=slow, reuse=a.reuse)
            model = model_rate(times, reps, a.slow_rank, factor, mode == "fixed")
            # the scheduler itself on these times, no runtime cost: ranks queue for each other
            sim, sim_counts = simulated_rate(reps, fwd, bwd, a.iterations, a.aggregate_every,
                                             mode, slow)
            tp = rep["throughput_per_s"]
            if factor == 1:
                base[mode] = (tp, model, sim)
            nodes = per_rank(rep, a.time_scale)
            rows.append({
                "chains": mode, "replicas": "/".join(map(str, reps)), "slow_rank": a.slow_rank,
                "slow_stage": nodes[a.slow_rank]["partition"] - 1, "factor": factor,
                **rate_fields(rep), "model_per_s": round(model, 4),
                "of_model": round(tp / model, 4),
                "loss_pct": round(100 * (1 - tp / base[mode][0]), 2),
                "model_loss_pct": round(100 * (1 - model / base[mode][1]), 2),
                "simulated_per_s": round(sim, 4), "of_simulated": round(tp / sim, 4),
                "simulated_loss_pct": round(100 * (1 - sim / base[mode][2]), 2),
                "simulated_slow_node_iterations": sim_counts[a.slow_rank],
                "slow_node_iterations": nodes[a.slow_rank]["iterations"],
                "iterations_per_rank": " ".join(str(n["iterations"]) for n in nodes)})
    for r in rows:  # issue 9's limit for dynamic chains: the slow node's share of its stage's
        # work, (1/3) x (1 - L/L') for a partition-1 node
        stage = 0 if r["chains"] == "fixed" else r["slow_stage"]
        l0 = sum(times[stage:])
        l1 = l0 + (r["factor"] - 1) * times[r["slow_stage"]]
        r["node_share_loss_pct"] = round(100 * (1 - l0 / l1) / 3, 2)
    write_csv(a.out_dir / "hetero.csv", rows)
    for r in rows:
        print(f"{r['chains']:8s} x{r['factor']:<4g} {r['throughput_per_s']:.3f}/s (model "
              f"{r['model_per_s']:.3f}), loss {r['loss_pct']:.1f} % (model "
              f"{r['model_loss_pct']:.1f} %, simulated {r['simulated_loss_pct']:.1f} %, slow "
              f"node's share {r['node_share_loss_pct']:.1f} %)"
              f", slow node ran {r['slow_node_iterations']}")
    plot(a.out_dir / "hetero.png", rows)
    return 0


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, col in (("fixed", "tab:gray"), ("dynamic", "tab:blue")):
        rs = [r for r in rows if r["chains"] == mode]
        ax.plot([r["factor"] for r in rs], [r["throughput_per_s"] for r in rs], "o-", color=col,
                label=f"{mode} (measured)")
        ax.plot([r["factor"] for r in rs], [r["model_per_s"] for r in rs], "x--", color=col,
                label=f"{mode} (one-mini-batch-per-node model)")
        ax.plot([r["factor"] for r in rs], [r["simulated_per_s"] for r in rs], "s:", color=col,
                label=f"{mode} (scheduler simulated, no runtime cost)")
    ax.set_xlabel("slowdown of one partition-1 node")
    ax.set_ylabel("mini-batches / s (emulated time)")
    ax.set_title("One slow node of six: fixed 2x3 vs dynamic 3/2/1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
