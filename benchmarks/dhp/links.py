"""Rate-limited links, emulated: one chain of the paper's three partitions (its 4.1 MB and 0.51 MB
cut tensors) over 1 Gbit/s, 100 Mbit/s and 10 Mbit/s, planner-predicted stage times (compute +
transfer) against the measured ones.

    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/links.py      # ~10 min, needs root

Ranks run inside `slurm/tx2/ratelimit.sh` (private network namespace, tc tbf on its loopback,
OpenMPI over TCP only). The namespace's loopback is ONE link shared by all ranks, so the run uses
one chain (1/1/1): only one message is in flight at a time, as on a switch with a link per node.
The planner gets the nominal rate (what a user would pass). Measured from the ranks' traces
(medians over mini-batches): a stage's compute (its sleeps), each cut's transfer (from the
sender's compute end to the receiver's compute start: scheduling included), the chain's time per
mini-batch. Predicted: the plan's compute_s + transfer_s per stage (one message over each cut
the stage touches) and total_time_s per mini-batch. Writes results/links.csv and links.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROFILES,
    RATELIMIT,
    RESULTS,
    hpcsrl_plan,
    read_trace,
    run_dhp,
    scaled_profile,
    write_csv,
)

RATES = {"1gbit": "1Gbit/s", "100mbit": "100Mbit/s", "10mbit": "10Mbit/s"}
TARGET = 0.15


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, default=PROFILES / "paper_table5.json")
    p.add_argument("--time-scale", type=float, default=0.1)
    p.add_argument("--rates", default="1gbit,100mbit,10mbit")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="emulated run length per rate (sets the iterations; at least 8)")
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/links"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--reuse", action="store_true",
                   help="re-derive the tables from the runs already in --runs")
    a = p.parse_args()

    scaled = scaled_profile(a.profile, a.time_scale, a.runs / "profile_scaled.json")
    rows = []
    for rate in a.rates.split(","):
        plan = hpcsrl_plan(scaled, a.runs / f"plan_{rate}.json", devices=3, total=3,
                           bandwidth=RATES[rate])  # one chain: 1/1/1
        iterations = max(8, int(a.seconds / plan["total_time_s"]))
        out = a.runs / rate
        rep = run_dhp(a.runs / f"plan_{rate}.json", a.profile, out, iterations,
                      chains="fixed", aggregate_every=iterations, time_scale=a.time_scale,
                      wrap=[str(RATELIMIT), "--rate", rate, "--"], reuse=a.reuse)
        tr = [d for d in read_trace(out).values() if len(d) == 3]
        n = len(plan["stages"])
        compute = [med([d[s]["forward_end"] - d[s]["forward_start"] + d[s]["backward_end"]
                        - d[s]["backward_start"] for d in tr]) for s in range(n)]
        act = [med([d[c]["forward_start"] - d[c - 1]["forward_end"] for d in tr])
               for c in range(1, n)]
        grad = [med([d[c - 1]["backward_start"] - d[c]["backward_end"] for d in tr])
                for c in range(1, n)]
        chain = med([d[0]["backward_end"] - d[0]["forward_start"] for d in tr])
        for s, st in enumerate(plan["stages"]):
            cuts = [c for c in (s, s + 1) if 1 <= c < n]  # cut c lies before stage c
            measured_x = sum((act[c - 1] + grad[c - 1]) / 2 for c in cuts)
            pred = st["compute_s"] + st["transfer_s"]
            meas = compute[s] + measured_x
            rows.append({"rate": rate, "stage": s, "iterations": rep["iterations"],
                         "predicted_compute_ms": round(1e3 * st["compute_s"], 2),
                         "measured_compute_ms": round(1e3 * compute[s], 2),
                         "predicted_transfer_ms": round(1e3 * st["transfer_s"], 2),
                         "measured_transfer_ms": round(1e3 * measured_x, 2),
                         "predicted_ms": round(1e3 * pred, 2), "measured_ms": round(1e3 * meas, 2),
                         "error_pct": round(100 * (pred - meas) / meas, 2),
                         "load_before": rep["load_before"], "load_after": rep["load_after"]})
        pred_chain = plan["total_time_s"]
        rows.append({"rate": rate, "stage": "chain", "iterations": rep["iterations"],
                     "predicted_compute_ms": round(1e3 * sum(s["compute_s"]
                                                             for s in plan["stages"]), 2),
                     "measured_compute_ms": round(1e3 * sum(compute), 2),
                     "predicted_transfer_ms": round(1e3 * plan["transfer_total_s"], 2),
                     "measured_transfer_ms": round(1e3 * (chain - sum(compute)), 2),
                     "predicted_ms": round(1e3 * pred_chain, 2),
                     "measured_ms": round(1e3 * chain, 2),
                     "error_pct": round(100 * (pred_chain - chain) / chain, 2),
                     "throughput_per_s": round(rep["throughput_per_s"], 4),
                     "bound_per_s": round(rep["bound_per_s"], 4),
                     "load_before": rep["load_before"], "load_after": rep["load_after"]})
        for r in rows[-n - 1:]:
            print(f"  {rate} stage {r['stage']}: predicted {r['predicted_ms']:.1f} ms, measured "
                  f"{r['measured_ms']:.1f} ms ({r['error_pct']:+.1f} %)", flush=True)
    write_csv(a.out_dir / "links.csv", rows)
    bad = [r for r in rows if abs(r["error_pct"]) > 100 * TARGET]
    print(f"{len(rows) - len(bad)}/{len(rows)} predictions within {TARGET:.0%} of measured")
    plot(a.out_dir / "links.png", rows)
    return 0


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    fig, axes = plt.subplots(1, len(rates), figsize=(4.5 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        rs = [r for r in rows if r["rate"] == rate]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["predicted_ms"] for r in rs], 0.4, color="lightgray",
               label="planner: compute + transfer")
        ax.bar([x + 0.2 for x in xs], [r["measured_ms"] for r in rs], 0.4, color="tab:blue",
               label="measured")
        ax.set_xticks(list(xs), [f"stage {r['stage']}" if r["stage"] != "chain" else "chain"
                                 for r in rs])
        ax.set_title(rate)
        ax.set_ylabel("ms per mini-batch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
