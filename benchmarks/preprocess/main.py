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
import statistics
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
    p.add_argument("--repeats", type=int, default=3,
                   help="timed pairs: rank counts run interleaved (1, 2, 1, 2, ...), and each "
                   "repeat's ratio is kept; the median and min/max of these are reported")
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


def remove_outputs(work: Path) -> None:
    """Delete every run's output and flush the file system, so each timed run (and write probe)
    starts with the same page cache: no earlier run's gigabytes still dirty, being written back or
    being freed meanwhile (the first write after freeing gigabytes was measured 3-4x slower)."""
    for path in work.glob("np*.h5.shards"):
        shutil.rmtree(path, ignore_errors=True)
    for path in work.glob("np*.h5"):
        path.unlink(missing_ok=True)
    os.sync()


def time_run(n: int, scenes: Path, out: Path, args: argparse.Namespace) -> dict:
    """One fresh `mpirun -np n hpcsrl-preprocess` (no shard reuse); seconds from the file."""
    remove_outputs(out.parent)
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
    shards = out.with_name(out.name + ".shards")
    nbytes = out.stat().st_size + sum(p.stat().st_size for p in shards.glob("*.h5"))
    return {"seconds": seconds, "wall": wall, "kept": kept, "tiled": kept + dropped,
            "cpu_max": max(cpu), "cpu_sum": sum(cpu), "load": load_before, "bytes": nbytes}


FIELDS = ["kind", "scene_set", "scenes", "patches", "strategy", "ranks", "max_load", "balance",
          "repeat", "seconds", "wall", "all_seconds", "patches_per_s", "paired_ratios",
          "speedup_median", "speedup_min", "speedup_max", "cpu_max_rank", "cpu_sum",
          "cpu_speedup_median", "loadavg_1m", "cpu_capacity_2proc", "output_bytes",
          "write_s_1proc", "write_s_2proc"]
BUSY = ("import time\nc = time.process_time()\nwhile time.process_time() - c < {cpu}: pass\n")
WRITE = ("import os, sys\nbuf = os.urandom(1 << 20)\nfd = os.open(sys.argv[1], os.O_WRONLY | "
         "os.O_CREAT | os.O_TRUNC)\nfor i in range(int(sys.argv[2]) >> 20):\n"
         "    os.pwrite(fd, buf, i << 20)\nos.close(fd)\n")


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


def write_seconds(folder: Path, nbytes: int) -> tuple[float, float]:
    """Wall seconds for one process to write `nbytes` of new files into `folder` (the output's
    file system, through the page cache as the shards are written), and for two processes to
    write half each at once: context for a pair's ratio (how fast this node's page cache takes a
    run's output from one writer and from two, right after the pair)."""
    def wall(parts: int) -> float:
        paths = [folder / f"write-probe-{i}.bin" for i in range(parts)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", WRITE, str(p), str(nbytes // parts)])
                 for p in paths]
        for proc in procs:
            proc.wait(timeout=300)
        seconds = time.perf_counter() - t0
        for p in paths:
            p.unlink(missing_ok=True)
        os.sync()
        return seconds
    return wall(1), wall(2)


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
    med = [r["speedup_median"] for r in thr]
    err = [[m - r["speedup_min"] for m, r in zip(med, thr, strict=True)],
           [r["speedup_max"] - m for m, r in zip(med, thr, strict=True)]]
    ax3.bar([str(r["ranks"]) for r in thr], med, yerr=err, capsize=6, color="tab:blue")
    for i, r in enumerate(thr):
        ax3.text(i, r["speedup_max"], f"x{r['speedup_median']:.2f} (median of pairs)\n"
                 f"{r['patches_per_s']:.0f} patches/s", ha="center", va="bottom", fontsize=8)
    ax3.set_xlabel("MPI ranks (2 shared cores)")
    ax3.set_ylabel("speed-up (paired runs; bars: min-max)")
    ax3.set_title("hpcsrl-preprocess, interleaved paired runs")
    ax3.margins(y=0.25)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def paired_ratios(runs: dict[int, list[dict]], base_n: int, n: int) -> list[float]:
    """Per repeat, the base rank count's time over n ranks' time in that same repeat: the pair ran
    back to back, so load from other users that drifts between repeats cancels in each ratio."""
    return [b["seconds"] / r["seconds"] for b, r in zip(runs[base_n], runs[n], strict=True)]


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

    # Rank counts interleaved (1, 2, 1, 2, ...): each repeat is a back-to-back pair.
    rank_counts = [int(x) for x in args.ranks.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in rank_counts}
    for rep in range(args.repeats):
        capacity = cpu_capacity()
        pair = []
        for n in rank_counts:
            run = time_run(n, scenes, args.work / f"np{n}.h5", args)
            run["capacity"] = capacity
            pair.append(run)
        # right after the pair, from the same clean page cache: the same bytes by one writer and
        # by two
        remove_outputs(args.work)
        writes = write_seconds(args.work, pair[0]["bytes"])
        for n, run in zip(rank_counts, pair, strict=True):
            run["writes"] = writes
            runs[n].append(run)
            log.info("repeat %d, %d rank(s): %.2f s, busiest rank %.2f CPU-s (load %.2f)", rep,
                     n, run["seconds"], run["cpu_max"], run["load"])
            rows.append({"kind": "run", "scene_set": "generated", "scenes": len(counts),
                         "patches": run["tiled"], "strategy": "split", "ranks": n,
                         "repeat": rep, "seconds": round(run["seconds"], 3),
                         "wall": round(run["wall"], 3), "cpu_max_rank": round(run["cpu_max"], 3),
                         "cpu_sum": round(run["cpu_sum"], 3), "loadavg_1m": round(run["load"], 2),
                         "cpu_capacity_2proc": capacity, "output_bytes": run["bytes"],
                         "write_s_1proc": round(run["writes"][0], 3),
                         "write_s_2proc": round(run["writes"][1], 3)})
    base_n = rank_counts[0]
    for n in rank_counts:
        ratios = paired_ratios(runs, base_n, n)
        cpu_ratios = [b["cpu_max"] / r["cpu_max"] for b, r in
                      zip(runs[base_n], runs[n], strict=True)]
        med = statistics.median(r["seconds"] for r in runs[n])
        rows.append({"kind": "throughput", "scene_set": "generated", "scenes": len(counts),
                     "patches": runs[n][0]["tiled"], "strategy": "split", "ranks": n,
                     "seconds": round(med, 3),
                     "all_seconds": " ".join(f"{r['seconds']:.2f}" for r in runs[n]),
                     "patches_per_s": round(runs[n][0]["tiled"] / med, 1),
                     "paired_ratios": " ".join(f"{x:.3f}" for x in ratios),
                     "speedup_median": round(statistics.median(ratios), 3),
                     "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3),
                     "cpu_max_rank": round(statistics.median(r["cpu_max"] for r in runs[n]), 3),
                     "cpu_speedup_median": round(statistics.median(cpu_ratios), 3),
                     "loadavg_1m": " ".join(f"{r['load']:.2f}" for r in runs[n]),
                     "cpu_capacity_2proc": " ".join(f"{r['capacity']:.2f}" for r in runs[n])})
        log.info("%d rank(s) vs %d: paired speedup median %.3f (min %.3f, max %.3f) over %d "
                 "pairs", n, base_n, statistics.median(ratios), min(ratios), max(ratios),
                 len(ratios))

    args.results.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.results / "preprocess.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.results / "preprocess.png")
    for r in rows:
        print(", ".join(f"{k}={r[k]}" for k in FIELDS if k in r))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"benchmarks/preprocess: error: {exc}", file=sys.stderr)
        sys.exit(2)
