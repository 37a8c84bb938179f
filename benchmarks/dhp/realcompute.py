"""Real compute: DHP pre-training of Lite-SRL on the demo HDF5 (3 stages, dynamic chains on six
ranks, as planned by `hpcsrl plan`), then a frozen-encoder evaluation, against single-process
`hpcsrl pretrain` on the same mini-batches (same epochs, batch, seed, schedule; both read the
split's pool only, each run drawing the same split, so the test patches are never seen).

    flock /tmp/hpcsrl-bench.lock python benchmarks/dhp/realcompute.py --epochs 10 --seeds 0,1,2
                                                                         # ~12 min idle

The demo data (`make demo`'s synthetic scenes, 12 Sentinel-2 bands, 48-px patches) is made under
--runs when absent. On two cores the wall time is not the point: the accuracy and the per-rank
traffic are. Writes results/realcompute.csv (one row per pre-training, seed and label fraction) and
realcompute_ranks.csv (the DHP run's per-rank report).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEMO_SCENES,
    RESULTS,
    demo_data,
    load1,
    mpirun_cmd,
    sh,
    write_csv,
)
from common import hpcsrl_cmd as hpcsrl  # noqa: E402

TARGET_POINTS = 1.0


def oa_rows(report: Path) -> list[dict[str, str]]:
    with report.open() as f:
        return list(csv.DictReader(f))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("/tmp/hpcsrl-dhp-bench/realcompute"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--aggregate-every", type=int, default=10)
    p.add_argument("--eval-epochs", type=int, default=30)
    p.add_argument("--scenes", type=int, default=DEMO_SCENES,
                   help="synthetic scenes (6: the demo's file; more for a larger test part, "
                   "made under RUNS/data_N)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of both sides (default: 0.05 x batch / 256)")
    p.add_argument("--seeds", default="0",
                   help="pre-training seeds (model init, data order, augmentations), e.g. 0,1,2: "
                   "each pre-training runs once per seed, so the OA difference between DHP and "
                   "the single process can be set against the spread between seeds")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    a = p.parse_args()
    r = a.runs
    r.mkdir(parents=True, exist_ok=True)
    data = demo_data(r if a.scenes == DEMO_SCENES else r / f"data_{a.scenes}", a.scenes)
    common = ["--batch-size", str(a.batch_size), "--input-size", str(a.input_size)]
    lr = ["--lr", str(a.lr)] if a.lr is not None else []
    prof, plan = r / "profile.json", r / "plan.json"
    sh(hpcsrl("profile", "--method", "lite-srl", "--backbone", "resnet18", "--bands", "12",
              *common, "--repeats", "2", "--threads", "1", "--out", str(prof)))
    sh(hpcsrl("plan", "--profile", str(prof), "--devices", "3", "--memory", "1GB",
              "--bandwidth", "1Gbit/s", "--objective", "throughput", "--total-devices", "6",
              "--out", str(plan)))
    replicas = [s["replicas"] for s in json.loads(plan.read_text())["stages"]]
    runs = {}
    seeds = [int(v) for v in a.seeds.split(",")]
    for seed in seeds:
        for name in ("dhp", "single"):
            out = r / f"{name}_s{seed}"
            if out.exists():
                shutil.rmtree(out)
            before = load1()
            if name == "dhp":
                wall = sh(mpirun_cmd(sum(replicas), hpcsrl(
                    "dhp", "--plan", str(plan), "--data", str(data), "--bands", "s2", "--out",
                    str(out), "--epochs", str(a.epochs), *lr, "--chains", "dynamic", "--seed",
                    str(seed), "--aggregate-every", str(a.aggregate_every))))
            else:
                wall = sh(hpcsrl("pretrain", "--data", str(data), "--bands", "s2", "--method",
                                 "lite-srl", "--backbone", "resnet18", "--epochs", str(a.epochs),
                                 *common, *lr, "--precise-bn", "0", "--threads", "1",
                                 "--no-progress", "--seed", str(seed), "--out", str(out)))
            ev = r / f"eval_{name}_s{seed}"
            sh(hpcsrl("evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data),
                      "--bands", "s2", "--mode", "freeze", "--label-fractions", "0.1,0.2",
                      "--epochs", str(a.eval_epochs), "--threads", "1", "--no-tsne", "--quiet",
                      "--out", str(ev)))
            runs[name, seed] = (wall, before, load1(), oa_rows(ev / "report.csv"))
    rows = []
    for (name, seed), (wall, before, after, report) in runs.items():
        for row in report:
            rows.append({"pretraining": name, "seed": seed, "replicas": "/".join(map(str, replicas))
                         if name == "dhp" else "1", "launch_wall_s": round(wall, 1),
                         **row, "load_before": before, "load_after": after})
    write_csv(a.out_dir / "realcompute.csv", rows)
    for frac in ("0.1000", "0.2000"):
        oa = {name: [float(x["oa"]) for x in rows if x["pretraining"] == name
                     and x["encoder"] == "lite-srl" and x["fraction"] == frac]
              for name in ("dhp", "single")}
        print(f"fraction {frac}: " + "; ".join(
            f"{n} OA {100 * sum(v) / len(v):.2f} (seeds: {' '.join(f'{100 * o:.2f}' for o in v)})"
            for n, v in oa.items()))
    rep = json.loads((r / f"dhp_s{seeds[0]}" / "dhp_report.json").read_text())
    write_csv(a.out_dir / "realcompute_ranks.csv",
              [{k: v for k, v in x.items() if k != "state_digests"} for x in rep["ranks"]])
    print(f"DHP: {rep['iterations']} iterations, {rep['throughput_per_s']:.3f}/s; see "
          f"{a.out_dir / 'realcompute.csv'} for OA side by side (target: within "
          f"{TARGET_POINTS} point)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
