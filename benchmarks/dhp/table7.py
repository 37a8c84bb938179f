"""Table 7 of the Lite-SRL paper, emulated: Lite-SRL with ResNet-34 (4 stages, batch 64) and
ResNet-50 (5 stages, batch 32), profiled here, planned by `hpcsrl plan` for 3 GB devices and six
nodes; one fixed chain (the other nodes idle, Fig. 15b-c) against dynamic chains on all six.

    python benchmarks/dhp/profiles/make_profiles.py --table7 DIR     # once (see its docstring)
    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/table7.py     # ~10 min

Each model is time-scaled so that one mini-batch's whole chain lasts --chain-seconds. Memory per
stage is the plan's (the profiler's measured parameters + gradient/momentum + saved activations at
the paper's batch). Writes results/table7.csv and table7.png.
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
    hpcsrl_plan,
    per_rank,
    run_dhp,
    scaled_profile,
    write_csv,
)

MODELS = (("resnet34", 4, 10185.9, (4895, 3984), 18.6), ("resnet50", 5, 13039.3, (6473, 5962), 6.9))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chain-seconds", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--aggregate-every", type=int, default=50)
    p.add_argument("--memory", default="3GB")
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/table7"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--reuse", action="store_true",
                   help="re-derive the tables from the runs already in --runs")
    a = p.parse_args()

    rows = []
    for backbone, stages, paper_mb, paper_ms, paper_pct in MODELS:
        prof = PROFILES / f"lite-srl_{backbone}.json"
        units = json.loads(prof.read_text())["units"]
        total = sum(u["forward_s"] + u["backward_s"] for u in units)
        scale = a.chain_seconds / total
        runs = a.runs / backbone
        scaled = scaled_profile(prof, scale, runs / "profile_scaled.json")
        plan = hpcsrl_plan(scaled, runs / "plan.json", devices=stages, total=6,
                           bandwidth="1000GB/s", memory=a.memory)
        allocation_plan(scaled, plan, [1] * stages, runs / "plan_fixed.json")
        reps = {}
        for mode, path in (("fixed", "plan_fixed.json"), ("dynamic", "plan.json")):
            reps[mode] = run_dhp(runs / path, prof, runs / mode, a.iterations, chains=mode,
                                 aggregate_every=a.aggregate_every, time_scale=scale,
                                 reuse=a.reuse)
        f, d = reps["fixed"], reps["dynamic"]
        for mode, rep in reps.items():
            nodes = per_rank(rep, scale)
            rows.append({
                "model": f"lite-srl/{backbone}", "stages": stages,
                "batch": json.loads(prof.read_text())["batch_size"], "chains": mode,
                "replicas": "/".join(map(str, rep["replicas"])), "nodes_used": len(nodes),
                "cuts": " ".join(map(str, plan["cuts"])), "time_scale": round(scale, 6),
                "profiled_s_per_minibatch": round(total, 2),
                "iterations": rep["iterations"], "wall_s": rep["wall_s"],
                "throughput_per_s": round(rep["throughput_per_s"], 4),
                "bound_per_s": round(rep["bound_per_s"], 4),
                "of_bound": round(rep["throughput_per_s"] / rep["bound_per_s"], 4),
                "s_per_iteration_profiled_scale": round(1 / rep["throughput_per_s"] / scale, 2),
                "time_reduction_pct": round(100 * (1 - f["throughput_per_s"]
                                                   / d["throughput_per_s"]), 2),
                "paper_ms": paper_ms[0] if mode == "fixed" else paper_ms[1],
                "paper_time_reduction_pct": paper_pct,
                "plan_stage_memory_MB": " ".join(f"{s['memory_bytes'] / 1e6:.0f}"
                                                 for s in plan["stages"]),
                "plan_total_memory_MB": round(sum(s["memory_bytes"]
                                                  for s in plan["stages"]) / 1e6, 1),
                "paper_memory_MB": paper_mb,
                "iterations_per_rank": " ".join(str(n["iterations"]) for n in nodes),
                "load_before": rep["load_before"], "load_after": rep["load_after"]})
            print(f"{backbone} {mode}: {rows[-1]['throughput_per_s']:.3f}/s "
                  f"({rows[-1]['of_bound']:.3f} of bound), time reduction "
                  f"{rows[-1]['time_reduction_pct']:.1f} % (paper {paper_pct} %)", flush=True)
    write_csv(a.out_dir / "table7.csv", rows)
    plot(a.out_dir / "table7.png", rows)
    return 0


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(models):
        for j, mode in enumerate(("fixed", "dynamic")):
            r = next(x for x in rows if x["model"] == m and x["chains"] == mode)
            ax[0].bar(i + (j - 0.5) * 0.35, r["throughput_per_s"], 0.35,
                      color="tab:gray" if mode == "fixed" else "tab:blue",
                      label=mode if i == 0 else None)
            ax[0].plot([i + (j - 0.5) * 0.35], [r["bound_per_s"]], "k_", ms=20)
        r = next(x for x in rows if x["model"] == m)
        mem = [float(v) for v in r["plan_stage_memory_MB"].split()]
        ax[1].bar([f"{m.split('/')[1]} s{k}" for k in range(len(mem))], mem, color=f"C{i}")
    ax[0].set_xticks(range(len(models)), models)
    ax[0].set_ylabel("mini-batches / s (emulated, chain = 1 s)")
    ax[0].set_title("One fixed chain vs dynamic chains on 6 nodes (-: bound)")
    ax[0].legend(fontsize=8)
    ax[1].axhline(3000, color="r", ls="--", lw=1)
    ax[1].set_ylabel("plan memory per stage (MB; 3 GB budget)")
    ax[1].tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
