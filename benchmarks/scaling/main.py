"""Scaling of data-parallel pre-training (MPI and Horovod backends): strong and weak scaling over
1, 2 and 4 ranks (4 oversubscribes a 2-core machine and is marked so), synthetic and real-data
modes, one compute thread per rank. Per run: time per step and per epoch, images/s, speed-up and
efficiency against the 1-rank run of the same group and repeat, the allreduce of the gradients
timed alone (hpcsrl's ring, MPI_Allreduce and, for Horovod runs, Horovod) beside the ring model
2(k-1)/k * S / B with B measured by a ping-pong, and the bytes each rank sent per step, counted by
OpenMPI's PML monitoring (every byte a rank hands to any transport, shared memory included; setup
traffic removed by differencing a run with fewer steps). Writes results/scaling.csv (one row per
run), results/scaling_summary.csv (medians over `--repeats`) and results/scaling.png.

Run it alone (other jobs on the cores distort every figure; the load is recorded):

    flock /tmp/hpcsrl-bench.lock python benchmarks/scaling/main.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from traffic import pml_sent_bytes, socket_tx_bytes

from hpcsrl.fileio import atomic_path
from hpcsrl.log import get_logger
from hpcsrl.parallel.horovod import DEFAULT_CONTROLLER, DEFAULT_CYCLE_TIME_MS

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
CORES = os.cpu_count() or 1
log = get_logger("hpcsrl.bench")
COLUMNS = ("group", "repeat", "mode", "scaling", "ranks", "oversubscribed", "micro_batch",
           "batches_per_allreduce", "global_batch", "cycle_time_ms", "yield_when_idle",
           "fp16_allreduce", "allreduce_groups", "independent", "backend", "horovod_controller",
           "step_s",
           "compute_s", "optimizer_step_s",
           "images_per_s", "epoch_images", "time_per_epoch_s", "speedup", "efficiency",
           "efficiency_per_core", "gradient_MB", "allreduce_horovod_s", "allreduce_mpi_s",
           "allreduce_ring_s", "allreduce_ring_model_s", "bandwidth_GBps",
           "bytes_sent_per_rank_per_step", "parallelism", "plan_stages", "minibatches",
           "bytes_sent_per_rank_per_step_max",
           "peak_rss_MB_per_rank", "accuracy", "accuracy_metric", "load_before", "load_after")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--data", type=Path, default=None,
                   help="HDF5 for the real-data mode (default: a generated 64-px RGB file)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=64,
                   help="patches per rank and backward pass in weak scaling (default 64)")
    p.add_argument("--epoch-images", type=int, default=27000,
                   help="images of the epoch that time_per_epoch_s refers to (default 27000, "
                   "EuroSAT)")
    p.add_argument("--quick", action="store_true", help="fewer runs: weak synthetic 1/2 ranks")
    p.add_argument("--only", default=None, metavar="GROUP,...",
                   help="run only these groups (e.g. weak,weak-2-passes) and append their rows "
                   "to an existing scaling.csv under a new timestamped group name")
    p.add_argument("--ranks", default="1,2,4", help="with --only: these rank counts")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each group's rank counts back to back this many times (1, 2, 1, "
                   "2, ...); efficiency is paired within a repeat and summarised by the median "
                   "of the pairs in scaling_summary.csv (the cores are shared: only a pair run "
                   "back to back compares like with like)")
    p.add_argument("--timeout", type=float, default=900)
    c = p.add_argument_group("DHP versus data parallel (see dhp_compare.py)")
    c.add_argument("--compare-dhp", action="store_true",
                   help="only this: Lite-SRL on 2 ranks with Horovod and with a 2-stage DHP plan, "
                   "same samples and mini-batches; rows appended to scaling.csv")
    c.add_argument("--compare-data", type=Path, default=None,
                   help="labelled patch HDF5 (default: the demo's synthetic file, made once)")
    c.add_argument("--compare-bands", default="s2")
    c.add_argument("--compare-epochs", type=int, default=2, help="at least 2 (default 2)")
    c.add_argument("--compare-batch", type=int, default=32, help="global batch (default 32)")
    c.add_argument("--compare-lr", type=float, default=0.05)
    c.add_argument("--compare-bandwidth", default="2GB/s",
                   help="link rate given to `hpcsrl plan` (default 2GB/s, shared memory)")
    c.add_argument("--eval-epochs", type=int, default=30, help="linear-probe epochs")
    c.add_argument("--compare-work", type=Path,
                   default=Path(tempfile.gettempdir()) / "hpcsrl-scaling-dhp")
    return p.parse_args(argv)


def runs(args: argparse.Namespace) -> list[dict]:
    """The sweep: (group, mode, scaling, ranks, micro-batch, batches/allreduce, cycle, fp16)."""
    m = args.micro_batch
    out = []

    def add(group: str, mode: str, scaling: str, ranks: int, micro: int, bpa: int = 1,
            cycle: str = DEFAULT_CYCLE_TIME_MS, fp16: bool = False,
            bytes_: bool = False, yield_: bool = False, groups: int | str = "auto",
            independent: bool = False, controller: str = DEFAULT_CONTROLLER,
            backend: str = "auto") -> None:
        out.append(dict(group=group, mode=mode, scaling=scaling, ranks=ranks, micro_batch=micro,
                        batches_per_allreduce=bpa, cycle_time_ms=cycle, fp16_allreduce=fp16,
                        measure_bytes=bytes_, yield_when_idle=yield_, allreduce_groups=groups,
                        independent=independent, horovod_controller=controller,
                        backend=backend))

    for k in (1, 2) if args.quick else (1, 2, 4):
        add("weak", "synthetic", "weak", k, m, bytes_=k > 1)
    if args.quick:
        return out
    for k in (1, 2):  # Horovod's DistributedOptimizer (what `auto` picks on spare cores)
        add("weak-horovod", "synthetic", "weak", k, m, bytes_=k > 1, backend="horovod")
    for k in (1, 2):
        add("weak-mpi-fp16", "synthetic", "weak", k, m, fp16=k > 1, backend="mpi")
    add("weak-horovod-defaults", "synthetic", "weak", 1, m, cycle="1", backend="horovod")
    add("weak-horovod-defaults", "synthetic", "weak", 2, m, cycle="1", backend="horovod")
    add("weak-cycle20", "synthetic", "weak", 1, m, cycle="20", backend="horovod")
    add("weak-cycle20", "synthetic", "weak", 2, m, cycle="20", backend="horovod")
    add("weak-2-passes", "synthetic", "weak", 1, m, bpa=2)
    add("weak-2-passes", "synthetic", "weak", 2, m, bpa=2)
    add("weak-yield", "synthetic", "weak", 1, m, yield_=True, backend="horovod")
    add("weak-yield", "synthetic", "weak", 2, m, yield_=True, backend="horovod")
    add("weak-2-passes-yield", "synthetic", "weak", 1, m, bpa=2, yield_=True, backend="horovod")
    add("weak-2-passes-yield", "synthetic", "weak", 2, m, bpa=2, yield_=True, backend="horovod")
    for k in (1, 2):  # control: K processes training alone (what the machine gives at the time)
        add("weak-independent", "synthetic", "weak", k, m, independent=True)
    for k in (1, 2):  # HOROVOD_CONTROLLER=gloo: blocking waits instead of OpenMPI's spinning
        add("weak-gloo-controller", "synthetic", "weak", k, m, bytes_=k > 1, controller="gloo",
            backend="horovod")
    for k in (1, 2):  # Horovod's per-tensor allreduces overlapping backward (auto on spare cores)
        add("weak-overlapped", "synthetic", "weak", k, m, groups=0, backend="horovod")
    for k in (1, 2):
        add("weak-grouped", "synthetic", "weak", k, m, groups=1, backend="horovod")
        add("weak-grouped-cycle5", "synthetic", "weak", k, m, groups=1, cycle="5",
            backend="horovod")
    add("weak-fp16", "synthetic", "weak", 1, m, backend="horovod")
    add("weak-fp16", "synthetic", "weak", 2, m, fp16=True, bytes_=True, backend="horovod")
    for k in (1, 2, 4):
        add("strong", "synthetic", "strong", k, 2 * m // k)
    for k in (1, 2):
        add("weak-real", "real", "weak", k, m)
    return out


def make_data(path: Path, n: int = 1024, size: int = 64) -> Path:
    """A 64-px RGB patch file with the schema PatchDataset reads (real-data mode default)."""
    import h5py

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (n, 3, size, size), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["patch_size"] = size
        f["rgb"] = rgb
        f.attrs["mean_rgb"] = rgb.mean(axis=(0, 2, 3))
        f.attrs["std_rgb"] = rgb.std(axis=(0, 2, 3))
    return path


def launch(run: dict, args: argparse.Namespace, data: Path, steps: int, warmup: int,
           work: Path) -> dict:
    """One mpirun of the worker; returns its JSON (+ bytes sent, when monitored)."""
    k = run["ranks"]
    out = work / "result.json"
    mon = work / "mon"
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "--map-by", "slot", "-np", str(k),
           "-x", f"HOROVOD_CYCLE_TIME={run['cycle_time_ms']}", "-x", "OMP_NUM_THREADS=1",
           "-x", f"HOROVOD_CONTROLLER={run['horovod_controller']}",
           "-x", f"HOROVOD_CPU_OPERATIONS={run['horovod_controller']}"]
    if run.get("yield_when_idle"):
        cmd += ["--mca", "mpi_yield_when_idle", "1"]
    if run["measure_bytes"]:
        cmd += ["--mca", "pml_monitoring_enable", "1", "--mca", "pml_monitoring_enable_output",
                "3", "--mca", "pml_monitoring_filename", str(mon)]
    cmd += [sys.executable, str(WORKER), "--mode", run["mode"], "--micro-batch",
            str(run["micro_batch"]), "--batches-per-allreduce", str(run["batches_per_allreduce"]),
            "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
    if run["mode"] == "real":
        cmd += ["--data", str(data)]
    if run["fp16_allreduce"]:
        cmd.append("--fp16-allreduce")
    if run.get("independent"):
        cmd.append("--independent")
    cmd += ["--groups", str(run["allreduce_groups"]), "--backend", run["backend"]]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    sockets_before = socket_tx_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    sockets = socket_tx_bytes() - sockets_before
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if run["measure_bytes"]:
        result["sent_bytes"] = float(np.mean(pml_sent_bytes(mon, k))) + sockets / k
    return result


def measure(run: dict, args: argparse.Namespace, data: Path) -> dict:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hpcsrl-scaling-") as tmp:
        res = launch(run, args, data, args.steps, args.warmup, Path(tmp))
    per_step_bytes = None
    if run["measure_bytes"]:
        with tempfile.TemporaryDirectory(prefix="hpcsrl-scaling-") as tmp:
            short = launch(run, args, data, 1, 0, Path(tmp))
        per_step_bytes = (res["sent_bytes"] - short["sent_bytes"]) / (
            res["optimizer_steps"] - short["optimizer_steps"])
    step_s = res["step_s"]
    row = {**{k: run[k] for k in ("group", "mode", "scaling", "ranks", "micro_batch",
                                  "batches_per_allreduce", "cycle_time_ms", "fp16_allreduce",
                                  "yield_when_idle", "allreduce_groups", "independent",
                                  "horovod_controller")},
           "backend": res.get("backend", run["backend"]),
           "oversubscribed": run["ranks"] > CORES, "global_batch": res["global_batch"],
           "step_s": step_s, "images_per_s": res["images_per_s"],
           # what "auto" resolved to on the ranks (1 rank: no allreduce, the request as given)
           "allreduce_groups": res.get("allreduce_groups", run["allreduce_groups"]),
           "compute_s": res.get("compute_s"), "optimizer_step_s": res.get("optimizer_step_s"),
           "epoch_images": args.epoch_images,
           "time_per_epoch_s": args.epoch_images / res["images_per_s"],
           "gradient_MB": res["gradient_bytes"] / 1e6,
           "allreduce_horovod_s": res.get("allreduce_horovod_s"),
           "allreduce_mpi_s": res.get("allreduce_mpi_s"),
           "allreduce_ring_s": res.get("allreduce_ring_s"),
           "allreduce_ring_model_s": res.get("allreduce_ring_model_s"),
           "bandwidth_GBps": res["bandwidth_Bps"] / 1e9 if "bandwidth_Bps" in res else None,
           "bytes_sent_per_rank_per_step": per_step_bytes,
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    log.info("%s %s k=%d: %.3f s/step, %.1f img/s%s", run["group"], run["scaling"], run["ranks"],
             step_s, res["images_per_s"],
             f", {per_step_bytes / 1e6:.1f} MB sent/rank/step" if per_step_bytes else "")
    return row


def _typed(row: dict) -> dict:
    """A CSV row back with numbers as numbers (empty -> None)."""
    out: dict = {}
    for k, v in row.items():
        if v == "":
            out[k] = None
        elif k in ("group", "mode", "scaling", "cycle_time_ms", "fp16_allreduce",
                   "oversubscribed", "yield_when_idle", "independent", "parallelism",
                   "plan_stages", "accuracy_metric", "horovod_controller", "backend",
                   "allreduce_groups"):
            out[k] = v
        else:
            out[k] = float(v) if "." in v or "e" in v else int(v)
    return out


def add_ratios(rows: list[dict]) -> None:
    """Speed-up and efficiency against the 1-rank run of the same group and repeat."""
    base = {(r["group"], r.get("repeat") or 0): r["images_per_s"] for r in rows
            if r["ranks"] == 1}
    for r in rows:
        one = base.get((r["group"], r.get("repeat") or 0))
        if one:
            r["speedup"] = r["images_per_s"] / one
            r["efficiency"] = r["speedup"] / r["ranks"]
            r["efficiency_per_core"] = r["speedup"] / min(r["ranks"], CORES)


SUMMARY = ("group", "backend", "ranks", "repeats", "images_per_s_median", "efficiency_median",
           "efficiency_min", "efficiency_max", "compute_s_median", "optimizer_step_s_median",
           "allreduce_ring_s_median", "allreduce_horovod_s_median", "allreduce_mpi_s_median",
           "allreduce_ring_model_s_median")


def summarise(rows: list[dict]) -> list[dict]:
    """Per (group, ranks): medians over the repeats, efficiency as the median of paired ratios."""
    out = []
    keys = dict.fromkeys((r["group"], r["ranks"]) for r in rows if not r.get("parallelism"))
    for group, ranks in keys:
        sel = [r for r in rows if r["group"] == group and r["ranks"] == ranks]

        def med(key: str, sel=sel) -> float | None:
            vals = [r[key] for r in sel if r.get(key) is not None]
            return float(np.median(vals)) if vals else None

        eff = [r["efficiency"] for r in sel if r.get("efficiency") is not None]
        out.append({"group": group, "backend": sel[0].get("backend"), "ranks": ranks,
                    "repeats": len(sel), "images_per_s_median": med("images_per_s"),
                    "efficiency_median": med("efficiency"),
                    "efficiency_min": min(eff) if eff else None,
                    "efficiency_max": max(eff) if eff else None,
                    "compute_s_median": med("compute_s"),
                    "optimizer_step_s_median": med("optimizer_step_s"),
                    "allreduce_ring_s_median": med("allreduce_ring_s"),
                    "allreduce_horovod_s_median": med("allreduce_horovod_s"),
                    "allreduce_mpi_s_median": med("allreduce_mpi_s"),
                    "allreduce_ring_model_s_median": med("allreduce_ring_model_s")})
    return out


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("parallelism")]  # DHP-vs-DP rows: a table, no curve
    paired = [r for r in rows if r.get("repeat") is not None]
    rows = paired or rows  # runs with --repeats (paired) when there are any; older rows stay in
    # the CSV but are not drawn: single-shot efficiencies on a shared machine mislead
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    summary = summarise(rows)  # medians over repeats (a single run is its own median)
    for group in dict.fromkeys(r["group"] for r in summary):
        sel = [r for r in summary if r["group"] == group]
        axes[0].plot([r["ranks"] for r in sel], [r["images_per_s_median"] for r in sel], "o-",
                     label=group)
    axes[0].set(xlabel="ranks (4: oversubscribed, 2 cores)", ylabel="images/s (median)",
                title="throughput", xticks=[1, 2, 4])
    axes[0].legend(fontsize=7)
    multi = [s for s in summary if s["ranks"] > 1 and s["efficiency_median"]]
    labels = [f"{s['group']}\nk={s['ranks']}" for s in multi]
    mid = np.array([s["efficiency_median"] for s in multi])
    spread = np.array([[m - s["efficiency_min"] for m, s in zip(mid, multi, strict=True)],
                       [s["efficiency_max"] - m for m, s in zip(mid, multi, strict=True)]])
    axes[1].bar(range(len(multi)), mid, yerr=spread, color="tab:blue", capsize=3)
    axes[1].axhline(0.85, color="red", ls="--", label="target 0.85")
    axes[1].set_xticks(range(len(multi)), labels, rotation=60, fontsize=6)
    axes[1].set(ylabel="efficiency (speed-up / ranks)",
                title="efficiency: median of paired repeats (bars: min-max)")
    axes[1].legend(fontsize=7)
    ar = [s for s in multi if s.get("allreduce_mpi_s_median") is not None]
    x = np.arange(len(ar))
    for i, (key, name) in enumerate((("allreduce_horovod_s_median", "Horovod"),
                                     ("allreduce_mpi_s_median", "MPI_Allreduce"),
                                     ("allreduce_ring_s_median", "hpcsrl ring"),
                                     ("allreduce_ring_model_s_median",
                                      "ring model 2(k-1)/k S/B"))):
        axes[2].bar(x + (i - 1.5) * 0.2, [(s.get(key) or 0) * 1e3 for s in ar], 0.2, label=name)
    axes[2].set_xticks(x, [f"{s['group']}\nk={s['ranks']}" for s in ar], rotation=60, fontsize=6)
    axes[2].set(ylabel="ms per gradient average (median)",
                title="gradient average alone: measured vs model")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [_typed(r) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.results / "scaling.csv"
    if args.compare_dhp:
        from dhp_compare import compare

        if args.compare_epochs < 2:
            log.error("--compare-epochs must be at least 2 (bytes per step come from the "
                      "difference with a 1-epoch run)")
            return 2
        args.stamp = time.strftime("%H:%M")
        rows = read_rows(path) + compare(args)
        write_csv(rows, path)
        log.info("wrote %s", path)
        return 0
    data = args.data
    if data is None:
        data = Path(tempfile.gettempdir()) / "hpcsrl-scaling-rgb64.h5"
        if not data.exists():
            make_data(data)
    rows = []
    todo = runs(args)
    if args.only:
        keep = set(args.only.split(","))
        ranks = {int(k) for k in args.ranks.split(",")}
        todo = [dict(r, group=f"{r['group']}@{time.strftime('%H:%M')}") for r in todo
                if r["group"] in keep and r["ranks"] in ranks]
        rows = read_rows(path)
    for group in dict.fromkeys(r["group"] for r in todo):
        for repeat in range(args.repeats):  # 1, 2, 1, 2, ...: each pair back to back
            for run in (r for r in todo if r["group"] == group):
                rows.append({**measure(run, args, data), "repeat": repeat})
                add_ratios(rows)
                write_csv(rows, path)
    write_csv(summarise(rows), args.results / "scaling_summary.csv", SUMMARY)
    plot(rows, args.results / "scaling.png")
    log.info("wrote %s and %s", args.results / "scaling.csv", args.results / "scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
