"""What the DHP benchmarks share: scaled profiles, plans from `hpcsrl plan` (and the same plan for
another replica allocation), emulated runs under mpirun, traces, CSV files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcsrl.fileio import atomic_path, write_json
from hpcsrl.planning.costs import Cluster, Costs
from hpcsrl.planning.plan import describe
from hpcsrl.planning.profile import load_profile

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROFILES = HERE / "profiles"
RESULTS = HERE / "results"
RATELIMIT = REPO / "slurm" / "tx2" / "ratelimit.sh"
PY = sys.executable
# OpenMPI's default non-blocking reduce (libnbc "chain") splits a large message into small
# segments, each needing a Test() from both sides: the runtime's polled Ireduce of a stage's
# 10.8 MB state took 2.9 s and of 195 MB about 60 s, against 0.011 s with the binomial
# algorithm (measured here, 2 ranks). Every benchmark run uses binomial.
MPI_ENV = {"OMPI_MCA_coll_libnbc_ireduce_algorithm": "2"}


def mpi_env() -> dict[str, str]:
    """The environment every benchmark's mpirun gets (root allowed, one thread, MPI_ENV)."""
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMP_NUM_THREADS="1", **MPI_ENV)


def hpcsrl_cmd(*args: str) -> list[str]:
    return [PY, "-m", "hpcsrl.cli.main", *args]


def mpirun_cmd(n: int, cmd: Sequence[str]) -> list[str]:
    return ["mpirun", "--oversubscribe", "--bind-to", "none", "--map-by", "slot", "-np", str(n),
            *cmd]


def sh(cmd: Sequence[str], timeout: float = 3600) -> float:
    """Run `cmd` (printed first); its wall seconds, or RuntimeError with its output's tail."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=mpi_env())
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


DEMO_SCENES = 6  # scripts/demo.sh's `hpcsrl synth --scenes`


def demo_data(folder: Path, scenes: int = DEMO_SCENES) -> Path:
    """The demo's patches (`make demo`'s synthetic scenes, 12 Sentinel-2 bands, 48 px), made
    under `folder` when absent (scripts/demo.sh steps 1-2); `scenes` > 6 makes more scenes of
    the same kind (a larger test part for accuracy comparisons)."""
    data = folder / "patches.h5"
    if not data.exists():
        folder.mkdir(parents=True, exist_ok=True)
        sh(hpcsrl_cmd("synth", "--out", str(folder / "scenes"), "--scenes", str(scenes),
                      "--size", "480", "--size-spread", "0.6", "--classes", "5", "--seed", "0"))
        sh(mpirun_cmd(2, [str(Path(PY).parent / "hpcsrl-preprocess"), "--input",
                          str(folder / "scenes"), "--output", str(data), "--patch-size", "48",
                          "--max-cloud", "0.3", "--force"]))
    return data


def load1() -> float:
    """The 1-minute load average (`uptime`'s first figure)."""
    return round(os.getloadavg()[0], 2)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}", flush=True)


def scaled_profile(src: Path, scale: float, dst: Path) -> Path:
    """`src` with every unit time multiplied by `scale`: the cluster the emulation runs at, so
    `hpcsrl plan` on it predicts exactly what `hpcsrl dhp --emulate src --time-scale scale`
    should do (transfers are not scaled: the bytes stay real)."""
    prof = json.loads(src.read_text())
    for u in prof["units"]:
        u["forward_s"] *= scale
        u["backward_s"] *= scale
    prof["emulation_time_scale"] = scale
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_json(dst, prof)
    return dst


def hpcsrl_plan(profile: Path, out: Path, devices: int, total: int, bandwidth: str,
                memory: str = "3GB", latency: str = "0") -> dict[str, Any]:
    """`hpcsrl plan --objective throughput` (the planner's own choice of cuts and replicas)."""
    cmd = [PY, "-m", "hpcsrl.cli.main", "plan", "--profile", str(profile), "--devices",
           str(devices), "--memory", memory, "--bandwidth", bandwidth, "--latency", latency,
           "--objective", "throughput", "--total-devices", str(total), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def allocation_plan(profile: Path, base: dict[str, Any], replicas: Sequence[int],
                    out: Path) -> dict[str, Any]:
    """`base`'s cuts with another replica allocation, described by the planner's own code (so
    its bound is the one `hpcsrl plan` lists for that allocation)."""
    prof = load_profile(profile)
    budgets = tuple(int(s["device_memory_bytes"]) for s in base["stages"])
    costs = Costs(prof, float(base["bandwidth_bytes_per_s"]), float(base["latency_s"]))
    cluster = Cluster(budgets, float(base["bandwidth_bytes_per_s"]), float(base["latency_s"]),
                      sum(replicas))
    plan = describe(prof, costs, cluster, "throughput", base["cuts"], list(replicas))
    write_json(out, plan)
    return plan


def run_dhp(plan: Path, profile: Path, out: Path, iterations: int, *, chains: str = "dynamic",
            aggregate_every: int = 100, time_scale: float = 1.0,
            slowdown: dict[int, float] | None = None, wrap: Sequence[str] = (),
            timeout: float = 1800, reuse: bool = False) -> dict[str, Any]:
    """One emulated run under mpirun (one rank per plan replica); its report plus the load
    before/after and the time spent between aggregations. `reuse`: read an earlier run's
    report in `out` instead of running again (to re-derive the tables)."""
    nranks = sum(int(s["replicas"]) for s in json.loads(plan.read_text())["stages"])
    side = out / "bench.json"
    if reuse and (out / "dhp_report.json").exists():
        rep = json.loads((out / "dhp_report.json").read_text())
        rep.update(json.loads(side.read_text()) if side.exists() else
                   {"load_before": None, "load_after": None})
    else:
        if out.exists():
            shutil.rmtree(out)
        env = mpi_env()
        cmd = [*wrap, *mpirun_cmd(nranks, hpcsrl_cmd(
               "dhp", "--plan", str(plan), "--emulate", str(profile), "--time-scale",
               repr(time_scale), "--out", str(out), "--iterations", str(iterations),
               "--aggregate-every", str(aggregate_every), "--chains", chains))]
        for r, f in (slowdown or {}).items():
            cmd += ["--slowdown", f"{r}={f}"]
        before, t0 = load1(), time.perf_counter()
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        rep = json.loads((out / "dhp_report.json").read_text())
        extra = {"load_before": before, "load_after": load1(),
                 "launch_s": round(time.perf_counter() - t0, 1)}
        write_json(side, extra)
        rep.update(extra)
    rep["between_aggregations_s"] = round(rep["wall_s"] - aggregation_pause(rep), 3)
    rep["throughput_between_aggregations_per_s"] = (rep["iterations"]
                                                    / rep["between_aggregations_s"])
    print(f"  {chains} {'/'.join(map(str, rep['replicas']))}: {rep['iterations']} it in "
          f"{rep['wall_s']:.1f} s, {rep['throughput_per_s']:.3f}/s, bound "
          f"{rep['bound_per_s']:.3f}/s ({rep['throughput_per_s'] / rep['bound_per_s']:.3f}; "
          f"{rep['throughput_between_aggregations_per_s'] / rep['bound_per_s']:.3f} between "
          f"aggregations), load {rep['load_before']} -> {rep['load_after']}", flush=True)
    return rep


def paper_plan(profile: Path, time_scale: float, runs: Path) -> tuple[Path, dict[str, Any]]:
    """The emulated cluster (`profile` x `time_scale`, written under `runs`) and `hpcsrl plan`'s
    throughput plan for it: 3 stages on six nodes, no transfer in the bound (the paper's node
    times include their communication; the runs still move the cut tensors)."""
    scaled = scaled_profile(profile, time_scale, runs / "profile_scaled.json")
    return scaled, hpcsrl_plan(scaled, runs / "plan.json", devices=3, total=6,
                               bandwidth="1000GB/s")


def rate_fields(rep: dict[str, Any]) -> dict[str, Any]:
    """The columns every run's CSV row shares: its rate against its plan's bound, with and
    without the aggregation pauses, and the machine's load around it."""
    return {"iterations": rep["iterations"], "wall_s": rep["wall_s"],
            "throughput_per_s": round(rep["throughput_per_s"], 4),
            "bound_per_s": round(rep["bound_per_s"], 4),
            "of_bound": round(rep["throughput_per_s"] / rep["bound_per_s"], 4),
            "of_bound_between_aggregations": round(
                rep["throughput_between_aggregations_per_s"] / rep["bound_per_s"], 4),
            "load_before": rep["load_before"], "load_after": rep["load_after"]}


def aggregation_pause(rep: dict[str, Any]) -> float:
    """Seconds of the wall time lost to aggregation rounds: the longest any rank spent in them
    (everyone waits for the slowest stage's averaging, since the next window's chains need all
    stages), for the rounds inside the wall time (the final one comes after it)."""
    rounds = -(-rep["iterations"] // rep["aggregate_every"])
    slowest = max(r["aggregate_s"] for r in rep["ranks"])
    return slowest * (rounds - 1) / rounds


def read_trace(out: Path) -> dict[int, dict[int, dict[str, float]]]:
    """mini-batch -> stage -> {rank, forward_start, forward_end, backward_start, backward_end}."""
    rows: dict[int, dict[int, dict[str, float]]] = {}
    for path in sorted(out.glob("emulate_trace_rank*.csv")):
        with path.open() as f:
            for r in csv.DictReader(f):
                rows.setdefault(int(r["mb"]), {})[int(r["stage"])] = {
                    k: float(v) for k, v in r.items() if k not in ("mb", "stage")}
    return rows


def hop_ms(trace: dict[int, dict[int, dict[str, float]]], stages: int) -> dict[str, float]:
    """Median measured time of each message hop (activation s -> s+1, gradient s+1 -> s): from the
    sender's compute end to the receiver's compute start, so scheduling and transfer together."""
    out = {}
    for s in range(stages - 1):
        act = [d[s + 1]["forward_start"] - d[s]["forward_end"] for d in trace.values()
               if s in d and s + 1 in d]
        grad = [d[s]["backward_start"] - d[s + 1]["backward_end"] for d in trace.values()
                if s in d and s + 1 in d]
        out[f"act_{s}{s + 1}_ms"] = round(1e3 * statistics.median(act), 2) if act else None
        out[f"grad_{s + 1}{s}_ms"] = round(1e3 * statistics.median(grad), 2) if grad else None
    return out


def per_rank(rep: dict[str, Any], time_scale: float) -> list[dict[str, Any]]:
    """Per node: iterations and average emulated compute per iteration (ms, and in the paper's
    unscaled ms)."""
    rows = []
    for r in sorted(rep["ranks"], key=lambda x: x["rank"]):
        it = r["iterations"]
        ms = 1e3 * r["busy_s"] / it if it else 0.0
        rows.append({"node": r["rank"] + 1, "rank": r["rank"], "partition": r["stage"] + 1,
                     "iterations": it, "runtime_ms": round(ms, 2),
                     "runtime_paper_ms": round(ms / time_scale, 1),
                     "wait_s": r["wait_s"], "aggregate_s": r["aggregate_s"],
                     "bytes_sent": r["bytes_sent"]})
    return rows
