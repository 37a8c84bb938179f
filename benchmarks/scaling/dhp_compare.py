"""DHP versus data parallelism (both backends) on 2 ranks, same model and samples
(main.py --compare-dhp).

Both pre-train Lite-SRL/ResNet-18 on the same labelled HDF5 (default: the demo's synthetic
12-band 48-px file, made when absent), with the same global mini-batches (the split's pool, each
run's default, drawn with the same seed), global batch, input size, LR (cosine by iteration, no
warm-up, plain momentum) and number of mini-batches:

- **dp-mpi** / **dp-horovod**: `mpirun -np 2 hpcsrl pretrain --data-parallel mpi|horovod` (each
  rank half of every mini-batch, one gradient average per step; mpi is the default here);
- **dhp**: `mpirun -np 2 hpcsrl dhp` on a 2-stage plan (`hpcsrl profile`, then
  `hpcsrl plan --objective throughput --devices 2 --total-devices 2`).

Per run: time per mini-batch (data parallel: the logged epoch seconds; DHP: its report's wall time,
both without start-up), bytes each rank sent per mini-batch (OpenMPI's PML monitoring for both
runtimes, start-up traffic removed by differencing a 1-epoch run; Horovod's Gloo sockets added
when used), peak RSS per rank
(`peak_rss.py`, the maximum over the ranks) and the final accuracy: overall accuracy of a linear
probe on the frozen encoder of the resulting checkpoint (`hpcsrl evaluate --mode freeze`, on the
test split of the same file, which neither pre-training read).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

from traffic import pml_sent_bytes, socket_tx_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dhp"))
from common import demo_data, mpirun_cmd, sh  # noqa: E402  (benchmarks/dhp: the same helpers)
from common import hpcsrl_cmd as hpcsrl  # noqa: E402

from hpcsrl.data import PatchDataset
from hpcsrl.log import get_logger

HERE = Path(__file__).resolve().parent
PEAK_RSS = HERE / "peak_rss.py"
RANKS = 2
log = get_logger("hpcsrl.bench")


def train(kind: str, a: argparse.Namespace, data: Path, plan: Path, epochs: int,
          work: Path) -> dict:
    """One monitored 2-rank pre-training; (seconds per mini-batch, mini-batches, bytes sent per
    rank, peak RSS per rank, run folder)."""
    run = work / f"{kind}-{epochs}ep"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    mon, rss = run / "mon", run / "rss"
    same = ["--data", str(data), "--bands", a.compare_bands, "--epochs", str(epochs),
            "--batch-size", str(a.compare_batch), "--input-size", "32", "--lr", str(a.compare_lr),
            "--monitor-samples", "0", "--seed", "0", "--out", str(run / "out")]
    if kind.startswith("dp-"):
        cmd = ["pretrain", "--method", "lite-srl", "--backbone", "resnet18", *same,
               "--precise-bn", "0", "--schedule", "cosine",
               "--warmup-epochs", "0", "--no-nesterov", "--threads", "1", "--no-progress",
               "--data-parallel", kind.removeprefix("dp-")]
    else:
        cmd = ["dhp", "--plan", str(plan), *same, "--aggregate-every", "100000", "--threads", "1"]
    sockets_before = socket_tx_bytes()
    sh(mpirun_cmd(RANKS, ["-x", "OMP_NUM_THREADS=1", "--mca", "pml_monitoring_enable", "1",
                          "--mca", "pml_monitoring_enable_output", "3", "--mca",
                          "pml_monitoring_filename", str(mon), sys.executable, str(PEAK_RSS),
                          str(rss), *cmd]), a.timeout)
    sockets = (socket_tx_bytes() - sockets_before) / RANKS  # Horovod's Gloo traffic, per rank
    if kind.startswith("dp-"):
        with open(run / "out" / "log.csv") as f:
            rows = list(csv.DictReader(f))
        seconds = sum(float(r["seconds"]) for r in rows)
        steps = round(sum(float(r["seconds"]) * float(r["images_per_s"]) for r in rows)
                      / a.compare_batch)
    else:
        rep = json.loads((run / "out" / "dhp_report.json").read_text())
        seconds, steps = float(rep["wall_s"]), int(rep["iterations"])
    sent = [b + sockets for b in pml_sent_bytes(mon, RANKS)]
    return {"step_s": seconds / steps, "steps": steps, "sent": sent,
            "rss": [int(Path(f"{rss}.{r}").read_text()) for r in range(RANKS)],
            "checkpoint": run / "out" / "checkpoint.pt"}


def accuracy(a: argparse.Namespace, checkpoint: Path, data: Path, out: Path) -> float:
    """Test OA of a linear probe on the frozen encoder (the report's first row)."""
    shutil.rmtree(out, ignore_errors=True)
    sh(hpcsrl("evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--bands",
              a.compare_bands, "--mode", "freeze", "--label-fractions", "0.5", "--epochs",
              str(a.eval_epochs), "--threads", "1", "--no-tsne", "--no-random-floor",
              "--no-knn-floor", "--quiet", "--out", str(out)), a.timeout)
    with open(out / "report.csv") as f:
        return float(next(csv.DictReader(f))["oa"])


def compare(a: argparse.Namespace) -> list[dict]:
    """The two runs (each twice: `compare_epochs` and 1 epoch, for the byte difference) and
    their rows for scaling.csv."""
    work = a.compare_work
    work.mkdir(parents=True, exist_ok=True)
    data = a.compare_data or demo_data(work / "demo")
    channels = PatchDataset(data, bands=a.compare_bands).channels
    prof, plan = work / "profile.json", work / "plan.json"
    sh(hpcsrl("profile", "--method", "lite-srl", "--backbone", "resnet18", "--bands",
              str(channels), "--input-size", "32", "--batch-size",
              str(a.compare_batch), "--repeats", "2", "--threads", "1", "--out", str(prof)),
       a.timeout)
    sh(hpcsrl("plan", "--profile", str(prof), "--devices", str(RANKS), "--memory", "4GB",
              "--bandwidth", a.compare_bandwidth, "--objective", "throughput",
              "--total-devices", str(RANKS), "--out", str(plan)), a.timeout)
    stages = json.loads(plan.read_text())["stages"]
    if len(stages) != RANKS:
        raise RuntimeError(f"{plan} has {len(stages)} stage(s), not {RANKS}: no pipeline to "
                           "compare (try another --compare-bandwidth)")
    cuts = " | ".join(f"{s['first_name']}..{s['last_name']}" for s in stages)
    rows = []
    for kind in ("dp-mpi", "dp-horovod", "dhp"):
        load_before = os.getloadavg()[0]
        full = train(kind, a, data, plan, a.compare_epochs, work)
        short = train(kind, a, data, plan, 1, work)
        per_step = [(f - s) / (full["steps"] - short["steps"])
                    for f, s in zip(full["sent"], short["sent"], strict=True)]
        oa = accuracy(a, full["checkpoint"], data, work / f"eval-{kind}")
        row = {"group": f"dhp-vs-dp@{a.stamp}", "mode": "real", "scaling": "same-model",
               "ranks": RANKS, "oversubscribed": False, "micro_batch": a.compare_batch // RANKS
               if kind.startswith("dp-") else a.compare_batch, "batches_per_allreduce": 1,
               "global_batch": a.compare_batch, "parallelism": kind,
               "backend": kind.removeprefix("dp-") if kind.startswith("dp-") else "dhp",
               "plan_stages": cuts if kind == "dhp" else "",
               "minibatches": full["steps"], "step_s": full["step_s"],
               "images_per_s": a.compare_batch / full["step_s"],
               "bytes_sent_per_rank_per_step": sum(per_step) / RANKS,
               "bytes_sent_per_rank_per_step_max": max(per_step),
               "peak_rss_MB_per_rank": max(full["rss"]) / 1e6,
               "accuracy": oa, "accuracy_metric": "linear-probe test OA, 50 % labels, "
               f"{a.eval_epochs} epochs, frozen encoder",
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        log.info("%s: %.3f s/mini-batch, %.2f MB sent/rank/step (max %.2f), peak RSS %.0f MB, "
                 "OA %.3f", kind, row["step_s"], row["bytes_sent_per_rank_per_step"] / 1e6,
                 max(per_step) / 1e6, row["peak_rss_MB_per_rank"], oa)
        rows.append(row)
    return rows
