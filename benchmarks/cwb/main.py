"""CWB study (Lite-SRL paper Sec. 6.1): memory balancing, candidate cuts, E per candidate, planner
speed, and predicted versus measured stage times. Writes CSV + PNG into --out-dir."""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from hpcsrl.fileio import atomic_path, write_json
from hpcsrl.planning.costs import Cluster, Costs
from hpcsrl.planning.plan import candidate_cuts, describe, make_plan
from hpcsrl.planning.profile import Profile, UnitProfile, load_profile
from hpcsrl.planning.quantities import parse_bandwidth, parse_latency, parse_size
from hpcsrl.planning.search import (
    min_stages,
    search_bottleneck,
    search_throughput,
    search_utilization,
)

MB = 1e6
PAPER_TOTAL_MB = {"resnet18": 7599.7, "resnet34": 10185.9, "resnet50": 13039.3}
PAPER_BATCH = {"resnet18": 64, "resnet34": 64, "resnet50": 32}
PAPER_TABLE5_S = [1.036, 1.140, 0.922]  # per-partition node time of one iteration (Table 5/6)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def build(backbone: str, bands: int, batch: int, size: int, seed: int = 0):
    import torch

    from hpcsrl.models.registry import build_method

    torch.manual_seed(seed)
    model = build_method("lite-srl", backbone, bands)
    model.train()
    x = [torch.randn(batch, bands, size, size) for _ in range(2)]
    return model, model.chain_input(*x)


def profile_model(args: argparse.Namespace, backbone: str, batch: int, timed: bool) -> Profile:
    """Memory at the paper's size; times (optional) at --time-batch-size/--time-input-size."""
    from hpcsrl.profiling.profiler import measure_memory, measure_times

    t0 = time.perf_counter()
    model, h = build(backbone, args.bands, batch, args.input_size)
    memory = measure_memory(model.units(), h, "sgd")
    names = [n for n, _ in model.units()]
    del model, h
    print(f"{backbone}: memory pass at batch {batch}, {args.input_size} px took "
          f"{time.perf_counter() - t0:.1f} s")
    times = [(0.0, 0.0)] * len(names)
    if timed:
        t0 = time.perf_counter()
        model, h = build(backbone, args.bands, args.time_batch_size, args.time_input_size)
        times = measure_times(model.units(), h, args.repeats, args.warmup, progress=True)
        print(f"{backbone}: timing at batch {args.time_batch_size}, {args.time_input_size} px "
              f"({args.warmup} warm-up + {args.repeats} runs per unit) took "
              f"{time.perf_counter() - t0:.1f} s")
    units = [UnitProfile(name=n, forward_s=fw, backward_s=bw, **m)
             for n, (fw, bw), m in zip(names, times, memory, strict=True)]
    return Profile(f"lite-srl/{backbone}", batch, [args.bands, args.input_size, args.input_size],
                   "sgd", units, extra={"time_batch_size": args.time_batch_size,
                                        "time_input_size": args.time_input_size})


def layer_output_bytes(backbone: str, args: argparse.Namespace, batch: int) -> list[int]:
    """Paper-style accounting per unit: every leaf layer's output counted twice (value + gradient).

    An estimate in the spirit of the paper's "memory of all intermediate values", for comparison
    with the measured saved-for-backward bytes; one forward without autograd.
    """
    import torch

    from hpcsrl.models.units import tensor_bytes

    model, h = build(backbone, args.bands, batch, args.input_size)
    units = model.units()
    per_unit, current = [0] * len(units), [0]

    def hook(_m: Any, _i: Any, out: Any) -> None:
        per_unit[current[0]] += 2 * tensor_bytes(out)

    handles = [m.register_forward_hook(hook) for _, u in units for m in u.modules()
               if not list(m.children())]
    with torch.no_grad():
        for i, (_, unit) in enumerate(units):
            current[0] = i
            h = unit(h)
    for handle in handles:
        handle.remove()
    return per_unit


def paper_style(prof: Profile, outputs: list[int]) -> Profile:
    units = [UnitProfile(**{**u.__dict__, "activation_bytes": o})
             for u, o in zip(prof.units, outputs, strict=True)]
    return Profile(prof.model, prof.batch_size, prof.input_shape, prof.optimizer, units,
                   extra={**prof.extra, "activation_accounting": "2 x leaf-layer outputs"})


def totals(args: argparse.Namespace, budget: int) -> dict[str, tuple[Profile, Profile]]:
    """Measured and paper-style profiles per backbone, and the memory_totals.csv table."""
    rows, profiles = [], {}
    for backbone in args.backbones:
        batch = args.batch_size if backbone != "resnet50" else args.batch_size // 2
        cached = args.out_dir / f"profile_{backbone}.json"
        if args.reuse_profiles and cached.exists():
            prof = load_profile(cached)
            print(f"{backbone}: reusing {cached}")
        else:
            prof = profile_model(args, backbone, batch, timed=backbone == "resnet18")
            write_json(cached, prof.to_json())
        paper = paper_style(prof, layer_output_bytes(backbone, args, batch))
        profiles[backbone] = (prof, paper)
        u = prof.units
        rows.append({
            "backbone": backbone, "batch_size": batch, "input_size": args.input_size,
            "params_MB": sum(x.param_bytes for x in u) / MB,
            "grad_momentum_MB": sum(x.state_bytes for x in u) / MB,
            "saved_activations_MB": sum(x.activation_bytes for x in u) / MB,
            "total_MB": prof.total_memory_bytes / MB,
            "devices_needed": min_stages(Costs(prof, 1.0), budget),
            "paper_style_activations_MB": sum(x.activation_bytes for x in paper.units) / MB,
            "paper_style_total_MB": paper.total_memory_bytes / MB,
            "paper_style_devices_needed": min_stages(Costs(paper, 1.0), budget),
            "paper_total_MB": PAPER_TOTAL_MB[backbone] if batch == PAPER_BATCH[backbone] else "",
            "budget_MB": budget / MB,
        })
        print(rows[-1])
    write_csv(args.out_dir / "memory_totals.csv", rows)
    return profiles


def fig13(args: argparse.Namespace, prof: Profile, costs: Costs, tag: str) -> None:
    rows = []
    for i, u in enumerate(prof.units):
        rows.append({"unit": i + 1, "name": u.name, "forward_s": u.forward_s,
                     "backward_s": u.backward_s, "param_bytes": u.param_bytes,
                     "state_bytes": u.state_bytes, "activation_bytes": u.activation_bytes,
                     "memory_MB": u.memory_bytes / MB, "output_bytes": u.output_bytes,
                     "cut_after_transfer_s": costs.cut[i + 1] / 1e12 if i + 1 < costs.q else ""})
    write_csv(args.out_dir / f"fig13_units_resnet18_{tag}.csv", rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(1, len(rows) + 1)
    fig, ax = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    bottom = [0.0] * len(rows)
    for key, label in (("param_bytes", "parameters"), ("state_bytes", "grad + momentum"),
                       ("activation_bytes", "activations")):
        vals = [r[key] / MB for r in rows]
        ax[0].bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax[0].set_ylabel("MB")
    ax[0].set_title(f"(b) training memory per unit, batch {prof.batch_size}, "
                    f"{prof.input_shape[1]} px (total {prof.total_memory_bytes / MB:.1f} MB)")
    ax[0].legend()
    ax[1].bar(x, [r["forward_s"] * 1e3 for r in rows], label="forward")
    ax[1].bar(x, [r["backward_s"] * 1e3 for r in rows],
              bottom=[r["forward_s"] * 1e3 for r in rows], label="backward")
    ax[1].set_ylabel("ms")
    ax[1].set_title(f"(c) time per unit on this CPU (batch {args.time_batch_size}, "
                    f"{args.time_input_size} px)")
    ax[1].legend()
    ax[2].bar(list(x)[:-1], [2 * costs.cut[i] / 1e9 for i in range(1, costs.q)], color="C2")
    ax[2].set_ylabel("ms")
    ax[2].set_title(f"round-trip transfer over the cut after each unit ({args.bandwidth})")
    ax[2].set_xticks(list(x))
    ax[2].set_xticklabels([f"p{i}" for i in x], rotation=90, fontsize=7)
    fig.tight_layout()
    with atomic_path(args.out_dir / f"fig13_units_resnet18_{tag}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def fig14(args: argparse.Namespace, prof: Profile, costs: Costs, cluster: Cluster,
          tag: str) -> dict:
    budgets = list(cluster.budgets)
    n = len(budgets)
    rows = []
    for cuts in candidate_cuts(costs, budgets):
        d = describe(prof, costs, cluster, "candidate", cuts, [1] * n)
        t_all = d["total_time_s"]
        row = {"cuts": " ".join(f"p{c + 1}" for c in cuts), "cut_index": list(cuts)}
        for i, s in enumerate(d["stages"]):
            row[f"device{i + 1}_share"] = s["compute_s"] / t_all
        row["transfer_share"] = d["transfer_total_s"] / t_all
        row["E"] = d["utilization_index"]
        row["bottleneck_s"] = d["bottleneck_s"]
        rows.append(row)
    best = make_plan(prof, cluster, "utilization")
    brute = max(rows, key=lambda r: (r["E"], [-c for c in r["cut_index"]]))
    print(f"{len(rows)} memory-feasible candidate cut sets on {n} devices; planner picks "
          f"{best['cuts']} (E = {best['utilization_index']:.4f}), brute force "
          f"{brute['cut_index']} (E = {brute['E']:.4f})")
    for r in rows:
        r["chosen"] = int(r["cut_index"] == best["cuts"])
        r["cut_index"] = " ".join(map(str, r["cut_index"]))
    write_csv(args.out_dir / f"fig14_candidates_resnet18_{tag}.csv", rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows if len(rows) <= 40 else sorted(
        sorted(rows, key=lambda r: -r["E"])[:40], key=lambda r: r["cut_index"])
    labels = [r["cuts"] for r in shown]
    fig, ax = plt.subplots(2, 1, figsize=(max(8, len(shown) * 0.35), 8), sharex=True)
    bottom = [0.0] * len(shown)
    for key in [f"device{i + 1}_share" for i in range(n)] + ["transfer_share"]:
        vals = [r[key] for r in shown]
        ax[0].bar(range(len(shown)), vals, bottom=bottom, label=key.replace("_share", ""))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax[0].set_ylabel("share of T_all")
    ax[0].set_title("(a) runtime proportion per device for each memory-feasible candidate"
                    + ("" if len(shown) == len(rows) else f" (best {len(shown)} of {len(rows)})"))
    ax[0].legend(fontsize=7)
    ax[1].plot(range(len(shown)), [r["E"] for r in shown], "o-")
    for i, r in enumerate(shown):
        if r["chosen"]:
            ax[1].plot([i], [r["E"]], "r*", markersize=14, label="CWB choice")
    ax[1].set_ylabel("E (Eq. 9)")
    ax[1].set_title("(b) equipment utilisation index per candidate")
    ax[1].legend()
    ax[1].set_xticks(range(len(shown)))
    ax[1].set_xticklabels(labels, rotation=90, fontsize=7)
    fig.tight_layout()
    with atomic_path(args.out_dir / f"fig14_candidates_resnet18_{tag}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return best


def stage_times(args: argparse.Namespace, plan: dict) -> None:
    """Predicted (sum of unit times) versus measured (the stage run alone) per stage.

    On a shared machine the load drifts between runs, so each repeat times the whole stage and
    then its units one by one, back to back; the profile's own prediction is listed too.
    """
    from hpcsrl.profiling.profiler import reference_pass, time_chain

    model, h = build("resnet18", args.bands, args.time_batch_size, args.time_input_size)
    units = model.units()
    inputs, masks, _ = reference_pass(units, h)
    rows = []
    for s in plan["stages"]:
        first, last = s["first_unit"], s["last_unit"]
        whole, parts = [], []
        for rep in range(args.warmup + args.repeats):
            fw, bw = time_chain(units[first:last + 1], inputs[first], masks[first], 1, 0)
            summed = sum(sum(time_chain([units[i]], inputs[i], masks[i], 1, 0))
                         for i in range(first, last + 1))
            if rep >= args.warmup:
                whole.append(fw + bw)
                parts.append(summed)
        pred, meas = statistics.median(parts), statistics.median(whole)
        rows.append({"stage": len(rows), "units": f"{first}..{last}",
                     "predicted_s": pred, "measured_s": meas,
                     "error_pct": 100 * (pred - meas) / meas,
                     "profile_predicted_s": s["compute_s"],
                     "profile_error_pct": 100 * (s["compute_s"] - meas) / meas})
        print(rows[-1])
    write_csv(args.out_dir / "stage_time_resnet18.csv", rows)


def allocations(args: argparse.Namespace, label: str, prof: Profile, cluster: Cluster) -> None:
    """Throughput bound of every replica allocation of 2n nodes (dynamic chains vs fixed)."""
    plan = make_plan(prof, cluster, "throughput")
    write_json(args.out_dir / f"plan_throughput_{label}.json", plan)
    chosen = [s["replicas"] for s in plan["stages"]]
    rows = [{"profile": label, "cuts": " ".join(map(str, plan["cuts"])),
             "replicas": "/".join(map(str, a["replicas"])),
             "bound_per_s": a["throughput_bound_per_s"], "chosen": int(a["replicas"] == chosen)}
            for a in plan["allocations"]]
    write_csv(args.out_dir / f"throughput_allocations_{label}.csv", rows)


def paper_table5(args: argparse.Namespace) -> None:
    """The paper's partition times (Table 5): which use of six nodes does the bound favour?"""
    units = [UnitProfile(f"partition{i + 1}", t, 0.0, 0, 0, 0, 0)
             for i, t in enumerate(PAPER_TABLE5_S)]
    paper = Profile("paper Table 5 partition times", 64, [3, 224, 224], "sgd", units)
    allocations(args, "paper_table5", paper, Cluster((1,) * 3, 1e12, 0.0, 6))


def planner_speed(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    rows = []
    for q, n in itertools.product((16, 32, 64, 128), (2, 4, 8, 16)):
        if n >= q:
            continue
        units = [UnitProfile(f"u{i}", rng.uniform(1e-3, 0.1), rng.uniform(1e-3, 0.2),
                             rng.randint(0, 10**7), rng.randint(0, 2 * 10**7),
                             rng.randint(0, 10**8), rng.randint(10**4, 10**7)) for i in range(q)]
        prof = Profile("random", 1, [3, 1, 1], "sgd", units)
        costs = Costs(prof, 125e6, 1e-4)
        budgets = [int(1.5 * prof.total_memory_bytes / n)] * n
        row: dict[str, Any] = {"units": q, "devices": n}
        for name, fn in (("utilization", partial(search_utilization, costs, budgets)),
                         ("bottleneck", partial(search_bottleneck, costs, budgets)),
                         ("throughput_2n", partial(search_throughput, costs, budgets, 2 * n))):
            if name.startswith("throughput") and q * n > 64 * 8:
                row[f"{name}_s"] = ""
                continue
            t0 = time.process_time()
            fn()
            row[f"{name}_s"] = time.process_time() - t0
        rows.append(row)
        print(row)
    write_csv(args.out_dir / "planner_time.csv", rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--batch-size", type=int, default=64, help="per view (ResNet-50 uses half)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--bands", type=int, default=3)
    p.add_argument("--time-batch-size", type=int, default=None,
                   help="batch for the timing runs (default --batch-size; smaller is faster)")
    p.add_argument("--time-input-size", type=int, default=None,
                   help="input size for the timing runs (default --input-size)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory", default="3GB", help="budget per device (paper: about 3 GB)")
    p.add_argument("--bandwidth", default="1Gbit/s")
    p.add_argument("--latency", default="0.1ms")
    p.add_argument("--backbones", default="resnet18,resnet34,resnet50")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-speed", action="store_true", help="skip the planner-speed table")
    p.add_argument("--skip-stage-times", action="store_true",
                   help="skip timing whole stages (predicted vs measured)")
    p.add_argument("--reuse-profiles", action="store_true",
                   help="load profile_<backbone>.json from --out-dir instead of measuring again")
    args = p.parse_args(argv)
    args.backbones = [b for b in args.backbones.split(",") if b]
    if "resnet18" not in args.backbones:
        args.backbones.insert(0, "resnet18")
    args.time_batch_size = args.time_batch_size or args.batch_size
    args.time_input_size = args.time_input_size or args.input_size
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    budget = parse_size(args.memory)
    if not args.skip_speed:
        planner_speed(args)
    paper_table5(args)
    profiles = totals(args, budget)
    bandwidth, latency = parse_bandwidth(args.bandwidth), parse_latency(args.latency)
    plans = {}
    for tag, prof in zip(("measured", "paperstyle"), profiles["resnet18"], strict=True):
        costs = Costs(prof, bandwidth, latency)
        n = min_stages(costs, budget)
        if n is None:
            print(f"{tag}: a single unit exceeds {args.memory}: nothing to plan", file=sys.stderr)
            continue
        n = max(n, 2)  # one device needs no partition; show the two-device flow instead
        cluster = Cluster((budget,) * n, bandwidth, latency)
        fig13(args, prof, costs, tag)
        plans[tag] = fig14(args, prof, costs, cluster, tag)
        write_json(args.out_dir / f"plan_utilization_resnet18_{tag}.json", plans[tag])
        allocations(args, f"resnet18_{tag}", prof, Cluster(cluster.budgets, bandwidth, latency,
                                                          2 * n))
    if not args.skip_stage_times and plans:
        stage_times(args, plans.get("paperstyle") or plans["measured"])
    print(f"done; results in {os.path.relpath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
