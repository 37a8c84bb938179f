"""Table 7 of the Lite-SRL paper, emulated: Lite-SRL with ResNet-34 (4 stages, batch 64) and
ResNet-50 (5 stages, batch 32), profiled here, planned by `hpcsrl plan` for 3 GB devices and six
nodes; one fixed chain (the other nodes idle, Fig. 15b-c) against dynamic chains on all six.

    python benchmarks/dhp/profiles/make_profiles.py --table7 DIR     # once (see its docstring)
    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/table7.py     # ~10 min

Each model is time-scaled so that one mini-batch's whole chain lasts --chain-seconds. Memory per
stage is the plan's (the profiler's measured parameters + gradient/momentum + saved activations at
the paper's batch) next to two measurements of each rank's peak resident memory (`peak_rss_bytes`
of dhp_report.json): the emulated run's (the runtime, the stage's parameter-sized state and cut
buffers; no model, no activations) and a short real-compute DHP run of the same cuts and replicas
on the demo data at --real-batch (the paper's batch takes over a minute per mini-batch here),
next to the plan's memory at that batch (activations scale with the batch). Writes
results/table7.csv, table7_memory.csv and table7.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROFILES,
    RESULTS,
    allocation_plan,
    demo_data,
    hpcsrl_cmd,
    hpcsrl_plan,
    mpirun_cmd,
    per_rank,
    rate_fields,
    run_dhp,
    scaled_profile,
    sh,
    write_csv,
)

from hpcsrl.fileio import write_json  # noqa: E402

MODELS = (("resnet34", 4, 10185.9, (4895, 3984), 18.6), ("resnet50", 5, 13039.3, (6473, 5962), 6.9))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chain-seconds", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--aggregate-every", type=int, default=50)
    p.add_argument("--memory", default="3GB")
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/table7"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--real-batch", type=int, default=4,
                   help="batch of the real-compute memory runs (0: none)")
    p.add_argument("--real-iterations", type=int, default=4)
    p.add_argument("--reuse", action="store_true",
                   help="re-derive the tables from the runs already in --runs")
    a = p.parse_args()

    rows, memory = [], []
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
        real = None
        if a.real_batch > 0:
            real = real_memory(prof, plan, runs / f"real_b{a.real_batch}", a.real_batch,
                               a.real_iterations, demo_data(a.runs / "data"), a.reuse)
        memory += memory_rows(f"lite-srl/{backbone}", plan, reps["dynamic"], real)
        f, d = reps["fixed"], reps["dynamic"]
        for mode, rep in reps.items():
            nodes = per_rank(rep, scale)
            rows.append({
                "model": f"lite-srl/{backbone}", "stages": stages,
                "batch": json.loads(prof.read_text())["batch_size"], "chains": mode,
                "replicas": "/".join(map(str, rep["replicas"])), "nodes_used": len(nodes),
                "cuts": " ".join(map(str, plan["cuts"])), "time_scale": round(scale, 6),
                "profiled_s_per_minibatch": round(total, 2),
                **rate_fields(rep),
                "s_per_iteration_profiled_scale": round(1 / rep["throughput_per_s"] / scale, 2),
                "time_reduction_pct": round(100 * (1 - f["throughput_per_s"]
                                                   / d["throughput_per_s"]), 2),
                "paper_ms": paper_ms[0] if mode == "fixed" else paper_ms[1],
                "paper_time_reduction_pct": paper_pct,
                "plan_stage_memory_MB": " ".join(f"{s['memory_bytes'] / 1e6:.0f}"
                                                 for s in plan["stages"]),
                "plan_total_memory_MB": round(sum(s["memory_bytes"]
                                                  for s in plan["stages"]) / 1e6, 1),
                "emulated_stage_peak_rss_MB": " ".join(
                    f"{m['emulated_peak_rss_MB']:.0f}" for m in memory
                    if m["model"] == f"lite-srl/{backbone}"),
                "real_batch": a.real_batch or None,
                "real_plan_stage_memory_MB": " ".join(
                    f"{m['real_plan_memory_MB']:.0f}" for m in memory
                    if m["model"] == f"lite-srl/{backbone}") if real else None,
                "real_stage_peak_rss_MB": " ".join(
                    f"{m['real_peak_rss_MB']:.0f}" for m in memory
                    if m["model"] == f"lite-srl/{backbone}") if real else None,
                "real_stage_above_runtime_MB": " ".join(
                    f"{m['real_stage_MB']:.0f}" for m in memory
                    if m["model"] == f"lite-srl/{backbone}") if real else None,
                "paper_memory_MB": paper_mb,
                "iterations_per_rank": " ".join(str(n["iterations"]) for n in nodes)})
            print(f"{backbone} {mode}: {rows[-1]['throughput_per_s']:.3f}/s "
                  f"({rows[-1]['of_bound']:.3f} of bound), time reduction "
                  f"{rows[-1]['time_reduction_pct']:.1f} % (paper {paper_pct} %)", flush=True)
    write_csv(a.out_dir / "table7.csv", rows)
    write_csv(a.out_dir / "table7_memory.csv", memory)
    plot(a.out_dir / "table7.png", rows, memory)
    return 0


def real_memory(prof: Path, plan: dict, out: Path, batch: int, iterations: int, data: Path,
                reuse: bool) -> dict:
    """A short real-compute DHP run of `plan`'s cuts and replicas at `batch` (the demo's RGB
    bands at the profile's 224 px): its report, with `plan_at_batch` (the plan's memory per
    stage with activations scaled to `batch`; parameters and optimizer state do not change)."""
    out.mkdir(parents=True, exist_ok=True)
    small = json.loads(prof.read_text())
    factor = batch / small["batch_size"]
    small["batch_size"] = batch
    for u in small["units"]:
        u["activation_bytes"] = int(u["activation_bytes"] * factor)
    write_json(out / "profile.json", small)
    replicas = [s["replicas"] for s in plan["stages"]]
    at_batch = allocation_plan(out / "profile.json", plan, replicas, out / "plan.json")
    run = out / "dhp"
    if not (reuse and (run / "dhp_report.json").exists()):
        if run.exists():
            shutil.rmtree(run)
        sh(mpirun_cmd(sum(replicas), hpcsrl_cmd(
            "dhp", "--plan", str(out / "plan.json"), "--data", str(data), "--bands", "rgb",
            "--out", str(run), "--iterations", str(iterations), "--aggregate-every",
            str(max(1, iterations // 2)), "--chains", "dynamic", "--timeout", "300")))
    rep = json.loads((run / "dhp_report.json").read_text())
    rep["plan_at_batch"] = at_batch
    return rep


def memory_rows(model: str, plan: dict, emulated: dict, real: dict | None) -> list[dict]:
    """Per stage: the plan's memory, the emulated and (if run) real-compute peak RSS (largest
    over the stage's replicas), in MB."""
    def peak(rep: dict, stage: int, key: str = "peak_rss_bytes") -> float:
        return max(r.get(key) or 0 for r in rep["ranks"] if r["stage"] == stage) / 1e6

    def own(rep: dict, stage: int) -> float:  # above what the rank held before its stage
        return max(r["peak_rss_bytes"] - (r.get("rss_before_stage_bytes") or 0)
                   for r in rep["ranks"] if r["stage"] == stage) / 1e6

    rows = []
    for i, st in enumerate(plan["stages"]):
        row = {"model": model, "stage": i, "units": f"{st['first_unit']}-{st['last_unit']}",
               "replicas": st["replicas"], "plan_memory_MB": round(st["memory_bytes"] / 1e6, 1),
               "emulated_peak_rss_MB": round(peak(emulated, i), 1)}
        if real is not None:
            row.update({"real_batch": real["plan_at_batch"]["batch_size"],
                        "real_plan_memory_MB": round(
                            real["plan_at_batch"]["stages"][i]["memory_bytes"] / 1e6, 1),
                        "real_peak_rss_MB": round(peak(real, i), 1),
                        # the interpreter, torch and MPI, before the stage exists
                        "real_rss_before_stage_MB": round(
                            peak(real, i, "rss_before_stage_bytes"), 1),
                        "real_stage_MB": round(own(real, i), 1)})
        rows.append(row)
    return rows


def plot(path: Path, rows: list[dict], memory: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    real = [m for m in memory if m.get("real_peak_rss_MB") is not None]
    fig, ax = plt.subplots(1, 3 if real else 2, figsize=(16 if real else 11, 4.2))
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
    if real:
        labels = [f"{m['model'].split('/')[1]} s{m['stage']}" for m in real]
        xs = range(len(real))
        ax[2].bar([x - 0.2 for x in xs], [m["real_plan_memory_MB"] for m in real], 0.4,
                  color="lightgray", label="plan")
        ax[2].bar([x + 0.2 for x in xs], [m["real_stage_MB"] for m in real], 0.4,
                  color="tab:green", label="measured peak RSS - RSS before the stage")
        ax[2].set_xticks(list(xs), labels, rotation=60)
        ax[2].set_ylabel(f"MB per stage at batch {real[0]['real_batch']} (real compute)")
        ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
