"""Preprocessing benchmark: patches/s of `hpcsrl-preprocess` with 1 and 2 real MPI ranks, and the
balance (max/mean patches per rank) of round-robin, whole-scene greedy and split assignment.

The scene set comes from the project's generator (`preprocess.synth`, skewed sizes). Balance is
pure computation: on the generated set and on a paper-sized set of 125 scenes drawn from the same
size distribution (Sedona et al. tiled 125 tiles on 72 CPUs), for several rank counts.
Writes results/preprocess.csv and results/preprocess.png.

    python benchmarks/preprocess/main.py [--scenes 12 --size 600 --ranks 1,2 --repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from hpcsrl.errors import UserError
from hpcsrl.fileio import atomic_path
from hpcsrl.log import get_logger
from preprocess import balance
from preprocess.readers import discover
from preprocess.synth import SynthConfig, draw_size, generate, scene_rng, size_quantile

HERE = Path(__file__).resolve().parent
log = get_logger("hpcsrl.bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path,
                   default=Path(tempfile.gettempdir()) / "hpcsrl-bench-preprocess",
                   help="folder for the generated scenes and outputs (reused across runs)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="CSV/PNG folder")
    p.add_argument("--scenes", type=int, default=12, help="generated scenes (default 12)")
    p.add_argument("--size", type=int, default=600, help="median scene side, px (default 600)")
    p.add_argument("--size-spread", type=float, default=0.9,
                   help="log-normal sigma of scene sides: the skew (default 0.9)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=120)
    p.add_argument("--ranks", default="1,2", help="rank counts to time under mpirun")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per rank count (best kept)")
    p.add_argument("--balance-ranks", default="2,4,8,16,32,72",
                   help="rank counts for the (pure) balance comparison")
    p.add_argument("--paper-scenes", type=int, default=125,
                   help="size of the second, sizes-only scene set for the balance comparison")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mpirun")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNG from an existing results/preprocess.csv")
    return p.parse_args(argv)


def balance_rows(set_name: str, counts: list[int], ranks: list[int]) -> list[dict]:
    rows = []
    for n in ranks:
        for strategy in balance.STRATEGIES:
            a = balance.assign(counts, n, strategy)
            loads = balance.loads(a)
            rows.append({"kind": "balance", "scene_set": set_name, "scenes": len(counts),
                         "patches": sum(counts), "strategy": strategy, "ranks": n,
                         "max_load": max(loads), "balance": round(balance.balance(a), 4)})
    return rows


def paper_sized_counts(args: argparse.Namespace) -> list[int]:
    """Patch counts of `paper_scenes` scenes with the generator's own size draw (no files)."""
    counts = []
    for i in range(args.paper_scenes):
        h, w = draw_size(scene_rng(args.seed, i), args.size, args.size_spread,
                         size_quantile(args.seed, i))
        counts.append((h // args.patch_size) * (w // args.patch_size))
    return counts


def time_run(n: int, scenes: Path, out: Path, args: argparse.Namespace) -> dict:
    """One fresh `mpirun -np n hpcsrl-preprocess` (no shard reuse); seconds from the file."""
    shutil.rmtree(out.with_name(out.name + ".shards"), ignore_errors=True)
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "--map-by", "slot", "-np", str(n),
           sys.executable, "-m", "preprocess.main", "--input", str(scenes), "--output", str(out),
           "--patch-size", str(args.patch_size), "--no-progress"]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"mpirun -np {n} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with h5py.File(out) as f:
        seconds = float(f.attrs["seconds"])
        cpu = [float(c) for c in f.attrs["rank_cpu_seconds"]]
        kept = len(f["label"])
        dropped = int(f.attrs["dropped_cloud"]) + int(f.attrs["dropped_nodata"])
    return {"seconds": seconds, "wall": wall, "kept": kept, "tiled": kept + dropped,
            "cpu_max": max(cpu), "cpu_sum": sum(cpu), "load": load_before}


BUSY = ("import time\nc = time.process_time()\nwhile time.process_time() - c < {cpu}: pass\n")


def cpu_capacity(cpu: float = 1.0) -> float:
    """How much more CPU two busy processes get than one on this machine right now (2.0 on two
    idle cores; ~1.0 when other users saturate it): the ceiling for any 2-rank speedup."""
    def wall(n: int) -> float:
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(cpu=cpu)])
                 for _ in range(n)]
        for proc in procs:
            proc.wait(timeout=120)
        return time.perf_counter() - t0
    return round(2 * wall(1) / wall(2), 3)


def read_rows(path: Path) -> list[dict]:
    """CSV rows back with numbers as numbers (empty cells dropped)."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict = {}
            for k, v in raw.items():
                if v == "":
                    continue
                try:
                    row[k] = int(v)
                except ValueError:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, set_name in ((ax1, "generated"), (ax2, "paper-sized")):
        sub = [r for r in rows if r["kind"] == "balance" and r["scene_set"] == set_name]
        for strategy, marker in zip(balance.STRATEGIES, "os^", strict=True):
            pts = sorted((r["ranks"], r["balance"]) for r in sub if r["strategy"] == strategy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=strategy)
        ax.axhline(1.02, color="grey", ls="--", lw=1, label="target 1.02")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r["ranks"] for r in sub})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("ranks")
        ax.set_ylabel("max / mean patches per rank")
        n = sub[0]["scenes"] if sub else 0
        ax.set_title(f"balance, {set_name} set ({n} scenes)")
        ax.legend(fontsize=8)
    thr = sorted((r for r in rows if r["kind"] == "throughput"), key=lambda r: r["ranks"])
    ax3.bar([str(r["ranks"]) for r in thr], [r["patches_per_s"] for r in thr], color="tab:blue")
    for i, r in enumerate(thr):
        ax3.text(i, r["patches_per_s"], f"{r['patches_per_s']:.0f} patches/s\nwall x"
                 f"{r['speedup']:.2f}, CPU-bound x{r['cpu_speedup']:.2f}",
                 ha="center", va="bottom", fontsize=8)
    ax3.set_xlabel("MPI ranks (2 shared cores)")
    ax3.set_ylabel("patches / s")
    ax3.set_title("hpcsrl-preprocess throughput")
    ax3.margins(y=0.25)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        plot(read_rows(args.results / "preprocess.csv"), args.results / "preprocess.png")
        return 0
    scenes = args.work / "scenes"
    cfg = SynthConfig(scenes=args.scenes, size=args.size, size_spread=args.size_spread,
                      seed=args.seed)
    log.info("generating %d scenes in %s (reused when present)", args.scenes, scenes)
    generate(scenes, cfg, command="benchmarks/preprocess/main.py")
    counts = [s.n_patches(args.patch_size) for s in discover(scenes).scenes]
    ranks = [int(x) for x in args.balance_ranks.split(",")]
    rows = balance_rows("generated", counts, ranks)
    rows += balance_rows("paper-sized", paper_sized_counts(args), ranks)

    # Rank counts interleaved per repeat, so drifting load from other users hits all alike.
    rank_counts = [int(x) for x in args.ranks.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in rank_counts}
    capacity = []
    for rep in range(args.repeats):
        capacity.append(cpu_capacity())
        for n in rank_counts:
            runs[n].append(time_run(n, scenes, args.work / f"np{n}.h5", args))
            log.info("repeat %d, %d rank(s): %.2f s (load %.1f)", rep, n,
                     runs[n][-1]["seconds"], runs[n][-1]["load"])
    base = base_cpu = None
    for n in rank_counts:
        best = min(runs[n], key=lambda r: r["seconds"])
        rate = best["tiled"] / best["seconds"]
        base = rate if base is None else base
        # CPU-bound view: the busiest rank's CPU seconds; what the speedup would be on idle cores
        cpu = min(r["cpu_max"] for r in runs[n])
        base_cpu = cpu if base_cpu is None else base_cpu
        rows.append({"kind": "throughput", "scene_set": "generated", "scenes": len(counts),
                     "patches": best["tiled"], "strategy": "split", "ranks": n,
                     "seconds": round(best["seconds"], 3), "wall": round(best["wall"], 3),
                     "all_seconds": " ".join(f"{r['seconds']:.2f}" for r in runs[n]),
                     "patches_per_s": round(rate, 1), "speedup": round(rate / base, 3),
                     "cpu_max_rank": round(cpu, 3), "cpu_speedup": round(base_cpu / cpu, 3),
                     "load_avg": round(sum(r["load"] for r in runs[n]) / len(runs[n]), 2),
                     "cpu_capacity_2proc": " ".join(f"{c:.2f}" for c in capacity)})
        log.info("%d rank(s): %.1f patches/s (runs %s s)", n, rate, rows[-1]["all_seconds"])

    args.results.mkdir(parents=True, exist_ok=True)
    fields = ["kind", "scene_set", "scenes", "patches", "strategy", "ranks", "max_load",
              "balance", "seconds", "wall", "all_seconds", "patches_per_s", "speedup",
              "cpu_max_rank", "cpu_speedup", "load_avg", "cpu_capacity_2proc"]
    with atomic_path(args.results / "preprocess.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.results / "preprocess.png")
    for r in rows:
        print(", ".join(f"{k}={r[k]}" for k in fields if k in r))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"benchmarks/preprocess: error: {exc}", file=sys.stderr)
        sys.exit(2)
