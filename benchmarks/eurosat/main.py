"""EuroSAT few-label study at a fixed pre-training budget: OA against pre-training minutes.

One command: draw (or reuse) the test / validation / pool split, pre-train Lite-SRL and SimSiam
with the same recipe for the same wall-clock minutes on the pool only (side by side, one core
each), snapshot each encoder at evenly spaced minutes, then evaluate every snapshot with a frozen
linear probe at 10 / 20 / 50 % labels (on the pooled last stage, and beside it, as rows
"freeze-stages", on the pooled last 1-3 stages concatenated, chosen on validation) and the final
encoders fine-tuned at 10 / 20 %, beside the random-init and channel-statistics floors. Every
choice (probe weight decay and epochs, stages, input size, k of the floor) is made on the
validation part; the test part is scored once per row.

    python benchmarks/eurosat/main.py --data eurosat_rgb.h5 --minutes 120 \\
        --out benchmarks/eurosat/results/budget120

Writes OUT/study.csv (one row per encoder x snapshot x mode x fraction: validation and test
figures and the chosen setting), the same as a Markdown table OUT/table.md,
OUT/oa_vs_minutes.png, OUT/summary.json (budget, seed, recipe, epochs reached, the validation
figures that chose) and the protocol's own reports under OUT/eval_freeze and OUT/eval_finetune.
Re-running with the same --out reuses finished pre-trainings (the split and the recipe must
match). Methods run as separate studies (`--jobs 1`,
possibly in separate sessions) are merged into one table and plot with `--combine A,B --out C`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpcsrl.fileio import write_json

HERE = Path(__file__).resolve().parent
METHODS = ("lite-srl", "simsiam")
STUDY_COLUMNS = ("encoder", "method", "minutes", "epoch", "mode", "fraction", "val_oa", "oa",
                 "kappa", "macro_f1", "selected", "n_train", "n_val", "n_test")
# What one method's pre-training depends on: a finished run is reused when these match, so a
# study can add a method later (`--jobs 1 --threads 2`: each method gets the whole machine for
# the budget, one after another, possibly in separate sessions).
RECIPE_KEYS = ("backbone", "stem", "width", "batch_size", "input_size", "lr", "augment",
               "precise_bn", "monitor_samples", "minutes", "limit", "split_seed", "seed",
               "precision", "threads", "jobs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="EuroSAT RGB patch HDF5 (hpcsrl-preprocess)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--minutes", type=float,
                   help="pre-training wall-clock minutes per method (the budget)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--stem", default="small", choices=("imagenet", "small", "mid"),
                   help="ResNet stem (default small: 8x8 cells from a 64-px chip; mid: 4x4)")
    p.add_argument("--width", type=int, default=32,
                   help="ResNet first-stage channels (default 32, chosen on validation in session "
                   "14 over 64: ~3x the epochs per budget)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32, help="view side in pixels")
    p.add_argument("--lr", type=float, default=0.05, help="SGD base lr (cosine)")
    p.add_argument("--augment", default="chips", help="view preset (hpcsrl.augment.views)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="forward passes of pre-training and evaluation (hpcsrl.precision; bf16 "
                   "is ~1.9x faster on CPUs with native bfloat16)")
    p.add_argument("--precise-bn", type=int, default=2048,
                   help="pool patches for BatchNorm statistics after each epoch")
    p.add_argument("--monitor-samples", type=int, default=512,
                   help="pool patches of the collapse / k-NN monitor after each epoch")
    p.add_argument("--limit", type=int, default=None,
                   help="pre-train on at most N pool patches (tiny validation runs)")
    p.add_argument("--snapshots", type=int, default=4,
                   help="evaluated snapshots per method, evenly spaced in minutes (default 4)")
    p.add_argument("--calibration-batches", type=int, default=12,
                   help="batches timed before the run to fix the epoch count for the budget")
    p.add_argument("--jobs", type=int, default=2,
                   help="methods pre-trained at once, one thread each (default 2)")
    p.add_argument("--threads", type=int, default=1, help="threads per pre-training job")
    p.add_argument("--eval-threads", type=int, default=2, help="threads for the evaluation")
    p.add_argument("--fractions", default="0.1,0.2,0.5", help="frozen-probe label fractions")
    p.add_argument("--finetune-fractions", default="0.1,0.2", help="fine-tune label fractions")
    p.add_argument("--probe-epochs", default="100,200", help="probe epochs (chosen on val)")
    p.add_argument("--probe-weight-decay", default="0,1e-4,1e-3",
                   help="probe weight decays (chosen on validation)")
    p.add_argument("--probe-stages", default="1,2,3",
                   help="freeze-stages rows: linear probe on the pooled last k ResNet stages "
                   "concatenated, k chosen on validation from this list ('' = no such rows; "
                   "the freeze rows keep the classic last-stage probe)")
    p.add_argument("--eval-input-size", default="0",
                   help="evaluation input sizes, 0 = native 64 px (a list is chosen on val)")
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tune rows")
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluate on a stratified subsample of this many chips (tiny runs)")
    p.add_argument("--split", default=None, help="split.json to reuse (default OUT/split.json)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="model / data order / probe seed")
    p.add_argument("--pilot", default=None, metavar="K=V,..;K=V,..",
                   help="candidate recipes (keys: stem, width, input_size, batch_size, lr, "
                   "augment), "
                   "each pre-trained with --pilot-method for --pilot-minutes and compared on "
                   "the validation part only; the best one is used for the budget run")
    p.add_argument("--pilot-minutes", type=float, default=15.0)
    p.add_argument("--pilot-method", default="lite-srl")
    p.add_argument("--pilot-only", action="store_true",
                   help="stop after the pilot (OUT/pilot/pilot.json): compare recipes on "
                   "validation before spending the budget")
    p.add_argument("--combine", default=None, metavar="DIR,DIR",
                   help="merge finished studies of different methods (same split and recipe, "
                   "e.g. `--jobs 1` runs from separate sessions) into OUT's study.csv, "
                   "oa_vs_minutes.png and summary.json; nothing is trained or evaluated")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one method's pre-training
    args = p.parse_args(argv)
    if args.combine is None and (args.data is None or args.minutes is None):
        p.error("--data and --minutes are required (except with --combine)")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recipe(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in RECIPE_KEYS}


# ------------------------------------------------------------------------------- pre-training
def pretrain_config(args: argparse.Namespace, method: str, epochs: int, limit: int | None):
    from hpcsrl.cli.pretrain import shape_options
    from hpcsrl.train.loop import PretrainConfig

    options = shape_options(args)
    return PretrainConfig(method=method, backbone=args.backbone, bands="rgb", epochs=epochs,
                          batch_size=args.batch_size, input_size=args.input_size, lr=args.lr,
                          seed=args.seed, limit=limit, monitor_samples=args.monitor_samples,
                          progress=False,
                          method_options=options, augment=args.augment,
                          precise_bn=args.precise_bn, precision=args.precision)


def pretrain_one(args: argparse.Namespace, method: str) -> dict:
    """Pre-train `method` for `args.minutes` on the pool; snapshots at evenly spaced minutes.

    The cosine schedule needs its length up front: a short calibration run times the step and
    the per-epoch overhead, the epoch count is what fits the budget, and the run stops early
    (recorded) if the machine turns out slower.
    """
    import torch

    from hpcsrl.data.splits import Layout, SplitPatches, load_split
    from hpcsrl.train.loop import MemoryPatches, Pretrainer

    torch.set_num_threads(args.threads)
    out = Path(args.out) / "pretrain" / method
    done = out / "done.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if rec.get("recipe") == recipe(args):
            log(f"{method}: reusing the finished pre-training in {out}")
            return rec
        shutil.rmtree(out)
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: its schedule was sized for another start
    split = load_split(Path(args.out) / "split.json", Layout.read(args.data))
    ds = MemoryPatches(SplitPatches(args.data, "rgb", split), progress=False)
    n_train = len(ds) if args.limit is None else min(args.limit, len(ds))

    calib = out / "calibration"
    n_cal = min(n_train, args.calibration_batches * args.batch_size)
    # Three short epochs, the fastest of the last two timed: the first one's steps include
    # one-off costs (allocator growth, oneDNN primitive creation) that made the first pilots
    # plan 4 epochs for 12 minutes and finish in 6.6 (session 11), and a test running beside
    # one timed epoch made session 12's study plan one epoch where two fitted.
    cal_cfg = pretrain_config(args, method, 3, n_cal)
    Pretrainer(ds, cal_cfg, calib).run(stop_after=1)
    timed = []
    for epoch in (2, 3):
        t0 = time.perf_counter()
        Pretrainer(ds, cal_cfg, calib, resume=True).run(stop_after=epoch)
        wall = time.perf_counter() - t0
        row = torch.load(calib / "checkpoint.pt", weights_only=False)["history"][-1]
        timed.append((float(row["seconds"]), max(0.0, wall - float(row["seconds"]))))
    seconds, overhead = min(timed)  # overhead: precise BN, monitor, checkpoint (per epoch)
    per_image = seconds / max(1, (n_cal // args.batch_size) * args.batch_size)
    epoch_s = per_image * n_train + overhead
    budget = args.minutes * 60
    epochs = max(1, int(budget // epoch_s))
    log(f"{method}: {1 / per_image:.1f} img/s, ~{epoch_s:.0f} s per epoch of {n_train} pool "
        f"patches -> {epochs} epoch(s) in {args.minutes:g} min")
    shutil.rmtree(calib)

    cfg = pretrain_config(args, method, epochs, args.limit)
    marks = [budget * (i + 1) / args.snapshots for i in range(args.snapshots)]
    snapshots: list[dict] = []
    start = time.perf_counter()
    truncated = False
    for epoch in range(1, epochs + 1):
        Pretrainer(ds, cfg, out / "run", resume=epoch > 1).run(stop_after=epoch)
        elapsed = time.perf_counter() - start
        last = epoch == epochs or elapsed > 1.05 * budget
        if last or (marks and elapsed >= marks[0] - 0.5 * epoch_s):
            path = out / f"snapshot_e{epoch:03d}.pt"
            shutil.copy(out / "run" / "checkpoint.pt", path)
            snapshots.append({"epoch": epoch, "minutes": round(elapsed / 60, 2),
                              "path": str(path)})
            log(f"{method}: snapshot after epoch {epoch}/{epochs}, {elapsed / 60:.1f} min")
            while marks and marks[0] - 0.5 * epoch_s <= elapsed:
                marks.pop(0)
        if last:
            truncated = epoch < epochs
            break
    history = torch.load(out / "run" / "checkpoint.pt", weights_only=False)["history"]
    rec = {"method": method, "epochs_planned": epochs, "epochs_done": snapshots[-1]["epoch"],
           "truncated": truncated, "minutes": snapshots[-1]["minutes"],
           "images_per_s": round(1 / per_image, 2), "n_pool_trained": n_train,
           "snapshots": snapshots, "recipe": recipe(args),
           "history": json.loads(json.dumps(history, default=float))}
    write_json(done, rec)
    return rec


def run_workers(args: argparse.Namespace, jobs: list[tuple[str, list[str], Path]]
                ) -> dict[str, dict]:
    """Each job (label, extra argv, its out folder) pre-trains one method in its own process,
    `--jobs` at once (one thread each), so methods running side by side share the cores fairly;
    returns each job's done.json."""
    out: dict[str, dict] = {}
    pending = list(jobs)
    running: list[tuple[str, Path, Path, subprocess.Popen]] = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            label, extra, folder = pending.pop(0)
            method = extra[extra.index("--worker") + 1]
            logpath = folder / f"pretrain_{method}.log"
            with open(logpath, "a") as logf:  # a reused pre-training keeps its log
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                         *args.argv, *extra], stdout=logf,
                                        stderr=subprocess.STDOUT, env=env)
            running.append((label, folder / "pretrain" / method / "done.json", logpath, proc))
        time.sleep(2)
        for item in list(running):
            label, done, logpath, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"pre-training {label} failed: see {logpath}")
                out[label] = json.loads(done.read_text())
                log(f"{label}: {out[label]['epochs_done']} epoch(s) in "
                    f"{out[label]['minutes']} min")
    return out


def pretrain_all(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    return run_workers(args, [(m, ["--worker", m], Path(args.out)) for m in methods])


PILOT_KEYS = {"stem": str, "width": int, "input_size": int, "batch_size": int, "lr": float,
              "augment": str}


def parse_pilot(text: str) -> list[dict]:
    """'stem=small,input_size=32;stem=imagenet' -> [{'stem': 'small', 'input_size': 32}, ...]"""
    out = []
    for cand in (c for c in text.split(";") if c.strip()):
        rec = {}
        for item in (i for i in cand.split(",") if i.strip()):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in PILOT_KEYS:
                raise SystemExit(f"--pilot {item!r}: keys are {', '.join(PILOT_KEYS)}")
            rec[key] = PILOT_KEYS[key](value.strip())
        out.append(rec)
    return out


def as_argv(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def pilot(args: argparse.Namespace, split) -> dict:
    """Pre-train `--pilot-method` with each candidate recipe for `--pilot-minutes`, compare the
    frozen probe on the validation part only (the test part is not read) and return the best."""
    import numpy as np
    import torch

    from hpcsrl.cli.evaluate import input_sizes, parse_fractions, parse_list
    from hpcsrl.data import PatchDataset
    from hpcsrl.eval.protocol import EvalSpec, LabelledData, run_protocol
    from hpcsrl.eval.train import FitConfig
    from hpcsrl.models.registry import model_from_checkpoint

    cands = parse_pilot(args.pilot)
    jobs = []
    for i, cand in enumerate(cands):
        folder = Path(args.out) / "pilot" / f"c{i}"
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "split.json", split.to_json())
        jobs.append((f"c{i}", [*as_argv(cand), "--out", str(folder), "--minutes",
                               str(args.pilot_minutes), "--snapshots", "1",
                               "--worker", args.pilot_method], folder))
    runs = run_workers(args, jobs)
    torch.set_num_threads(args.eval_threads)
    encoders, names = {}, {}
    for i, cand in enumerate(cands):
        label = ",".join(f"{k}={v}" for k, v in cand.items()) or "default"
        names[label] = cand
        encoders[label] = model_from_checkpoint(runs[f"c{i}"]["snapshots"][-1]["path"]
                                                )[0].encoder.eval()
    ds = PatchDataset(args.data, bands="rgb")
    first = parse_fractions(args.fractions)[:1]
    epochs = parse_list(args.probe_epochs, "--probe-epochs", int, 1)
    spec = EvalSpec(modes=("freeze",), fractions=first, seed=args.seed,
                    max_samples=args.max_samples, tsne=False, knn_floor=False,
                    input_sizes=input_sizes(args.eval_input_size),
                    probe_weight_decays=parse_list(args.probe_weight_decay,
                                                   "--probe-weight-decay", float, 0.0),
                    probe_epochs=epochs, score_test=False,
                    fit=FitConfig(epochs=max(epochs), seed=args.seed, progress=False,
                                  precision=args.precision))
    rows = run_protocol(LabelledData(lambda i: ds.read_batch(i)[0], np.asarray(ds.labels),
                                     list(ds.class_names)), encoders, spec,
                        Path(args.out) / "pilot" / "eval", split=split)
    best = max(rows, key=lambda r: r["val_oa"])
    result = {"method": args.pilot_method, "minutes": args.pilot_minutes,
              "fraction": first[0], "chosen": names[best["encoder"]],
              "chosen_val_oa": best["val_oa"],
              "candidates": [{"recipe": r["encoder"], "val_oa": r["val_oa"],
                              "probe": r["selected"],
                              "epochs": runs[f"c{list(names).index(r['encoder'])}"]
                              ["epochs_done"]} for r in rows]}
    for c in result["candidates"]:
        log(f"pilot {c['recipe']:<32} val OA {c['val_oa']:.4f} ({c['epochs']} epochs)")
    log(f"pilot choice: {best['encoder']} (validation OA {best['val_oa']:.4f} at "
        f"{first[0]:.0%} labels)")
    return result


# ------------------------------------------------------------------------------- evaluation
def at_budget(method: str, run: dict, minutes: float) -> str:
    """The encoder name of the snapshot nearest the budget: the one fine-tuned and summarised.
    The last snapshot can lie past the budget (the calibration over-planned and the run went on
    to the 1.05 x cap: session 17 stopped at 126.6 min, its 2-hour snapshot is at 120.2)."""
    return f"{method}@{nearest([s['minutes'] for s in run['snapshots']], minutes):g}min"


def nearest(snapshot_minutes: list[float], minutes: float) -> float:
    return min(snapshot_minutes, key=lambda m: (abs(m - minutes), -m))


def chosen_on_validation(rows: list[dict], budget: float) -> list[dict]:
    """Per method, mode and fraction, the snapshot up to the budget with the best validation OA
    (early stopping on the validation part, ties to the earlier snapshot), with its test OA: a
    longer run is not assumed to be better (session 17's frozen 10 % row peaked at 90 min on
    validation and test alike)."""
    out = []
    methods = sorted({r["method"] for r in rows if r["method"] in METHODS})
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        bound = nearest(sorted({float(r["minutes"]) for r in mine}), budget)
        for mode, fraction in sorted({(r["mode"], float(r["fraction"])) for r in mine}):
            cands = [r for r in mine if r["mode"] == mode and float(r["fraction"]) == fraction
                     and float(r["minutes"]) <= bound]
            best = max(cands, key=lambda r: (float(r["val_oa"]), -float(r["minutes"])))
            out.append({"method": m, "mode": mode, "fraction": fraction,
                        "encoder": best["encoder"], "minutes": float(best["minutes"]),
                        "val_oa": float(best["val_oa"]), "oa": float(best["oa"]),
                        "candidates": len(cands)})
    return out


def evaluate(args: argparse.Namespace, runs: dict[str, dict]) -> list[dict]:
    """Freeze every snapshot, fine-tune the ones at the budget; floors beside; one protocol run
    each."""
    import numpy as np
    import torch

    from hpcsrl.cli.evaluate import input_sizes, parse_fractions, parse_list
    from hpcsrl.data import PatchDataset
    from hpcsrl.data.splits import Layout, load_split
    from hpcsrl.eval.protocol import EvalSpec, LabelledData, run_protocol
    from hpcsrl.eval.train import FitConfig
    from hpcsrl.models.registry import model_from_checkpoint, model_from_config

    torch.set_num_threads(args.eval_threads)
    split = load_split(Path(args.out) / "split.json", Layout.read(args.data))
    ds = PatchDataset(args.data, bands="rgb")
    data = LabelledData(lambda i: ds.read_batch(i)[0], np.asarray(ds.labels),
                        list(ds.class_names))
    encoders, final, meta = {}, {}, {}
    config = None
    for m, run in runs.items():
        for snap in run["snapshots"]:
            model, ckpt = model_from_checkpoint(snap["path"])
            name = f"{m}@{snap['minutes']:g}min"
            encoders[name] = model.encoder.eval()
            meta[name] = {"method": m, "minutes": snap["minutes"], "epoch": snap["epoch"]}
            config = ckpt["config"]
        name = at_budget(m, run, args.minutes)
        final[name] = encoders[name]
    torch.manual_seed(args.seed)
    cfg = dict(config, method="lite-srl")
    cfg = {k: v for k, v in cfg.items()
           if k in ("method", "backbone", "in_channels", "stem", "width")}
    encoders["random-init"] = final["random-init"] = model_from_config(cfg).encoder.eval()
    meta["random-init"] = {"method": "random-init", "minutes": 0, "epoch": 0}
    fit = FitConfig(epochs=max(parse_list(args.probe_epochs, "--probe-epochs", int, 1)),
                    finetune_epochs=args.finetune_epochs, seed=args.seed, progress=False,
                    precision=args.precision)
    common = dict(seed=args.seed, max_samples=args.max_samples, tsne=False,
                  input_sizes=input_sizes(args.eval_input_size),
                  probe_weight_decays=parse_list(args.probe_weight_decay, "--probe-weight-decay",
                                                 float, 0.0),
                  probe_epochs=parse_list(args.probe_epochs, "--probe-epochs", int, 1), fit=fit)
    def protocol(modes: tuple[str, ...], chosen: dict, fractions: str, **extra) -> list[dict]:
        """One protocol run per kind (OUT/eval_<first mode>), reused when it already finished."""
        folder = Path(args.out) / f"eval_{modes[0]}"
        rows = finished_report(folder, chosen, modes)
        if rows is None:
            log(f"{'+'.join(modes)}: {len(chosen)} encoders on split {split.digest()}")
            rows = run_protocol(data, chosen, EvalSpec(
                modes=modes, fractions=parse_fractions(fractions), **extra, **common),
                folder, split=split)
        return rows

    stages = parse_list(args.probe_stages, "--probe-stages", int, 1) if args.probe_stages \
        else ()
    rows = protocol(("freeze", "freeze-stages") if stages else ("freeze",), encoders,
                    args.fractions, probe_stages=stages or (1,))
    if not args.no_finetune:
        rows += protocol(("finetune",), final, args.finetune_fractions, knn_floor=False)
    out = []
    for r in rows:
        info = meta.get(r["encoder"], {"method": r["encoder"], "minutes": "", "epoch": ""})
        out.append({**{k: r.get(k) for k in STUDY_COLUMNS}, **info,
                    "encoder": r["encoder"]})
    return out


def finished_report(folder: Path, encoders: dict, modes: tuple[str, ...]
                    ) -> list[dict] | None:
    """The rows of an evaluation that already finished in `folder` for exactly these encoders
    and modes (a re-run with the same --out reuses it, as it reuses finished pre-trainings),
    else None. Any other change of the settings must use a new --out: the report does not
    record them."""
    path = folder / "report.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if ({r["encoder"] for r in rows} - {"channel-stats"} != set(encoders)
            or {r["mode"] for r in rows} - {"knn"} != set(modes)):
        return None
    log(f"reusing the finished evaluation in {folder}")
    for r in rows:
        for k, v in r.items():
            if k in ("n_train", "n_val", "n_test", "candidates") and v:
                r[k] = int(float(v))
            elif k not in ("encoder", "mode", "selected") and v not in ("", None):
                r[k] = float(v)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=STUDY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) and k not in ("minutes",)
                            else v) for k, v in r.items()})


def write_table(path: Path, rows: list[dict]) -> None:
    """study.csv as the Markdown table a README quotes: one line per encoder, "validation / test"
    OA per mode and fraction (the channel-statistics k-NN in the freeze columns)."""
    cols = sorted({(r["mode"].replace("knn", "freeze"), r["fraction"]) for r in rows},
                  key=lambda c: (("freeze", "freeze-stages", "finetune").index(c[0])
                                 if c[0] in ("freeze", "freeze-stages", "finetune") else 9, c))
    cells: dict[str, dict] = {}
    for r in rows:
        cells.setdefault(f"{r['encoder']} (epoch {r['epoch']})" if r["encoder"] not in FLOORS
                         else r["encoder"], {})[(r["mode"].replace("knn", "freeze"),
                                                r["fraction"])] = r
    lines = ["| encoder | " + " | ".join(f"{m} {f:.0%}" for m, f in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, by_col in cells.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{by_col[c]['val_oa']:.3f} / {by_col[c]['oa']:.3f}" if c in by_col else "-"
            for c in cols) + " |")
    path.write_text("OA on validation / test (settings chosen on validation)\n\n"
                    + "\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    colours = {"lite-srl": "tab:blue", "simsiam": "tab:orange"}
    styles = {0.1: "-", 0.2: "--", 0.5: ":"}
    for m in sorted({r["method"] for r in rows if r["method"] in colours}):
        for f in sorted({r["fraction"] for r in rows if r["mode"] == "freeze"}):
            pts = sorted((r["minutes"], r["oa"]) for r in rows
                         if r["method"] == m and r["mode"] == "freeze" and r["fraction"] == f)
            if pts:
                ax.plot(*zip(*pts, strict=True), styles.get(f, "-"), marker="o",
                        color=colours[m], label=f"{m} freeze {f:.0%}")
        pts = sorted((r["minutes"], r["oa"]) for r in rows
                     if r["method"] == m and r["mode"] == "freeze-stages" and r["fraction"] == 0.1)
        if pts:
            ax.plot(*zip(*pts, strict=True), "-", marker="s", alpha=0.5, color=colours[m],
                    label=f"{m} freeze-stages 10%")
        ft = [(r["minutes"], r["oa"], r["fraction"]) for r in rows
              if r["method"] == m and r["mode"] == "finetune"]
        left = m == min(colours)  # one method's labels left of the stars, the other's right
        for i, (x, y, f) in enumerate(ft):
            ax.scatter([x], [y], marker="*", s=120, color=colours[m], zorder=3,
                       label=f"{m} fine-tuned" if i == 0 else None)
            ax.annotate(f"ft {f:.0%} {y:.3f}", (x, y), textcoords="offset points",
                        xytext=(-7 if left else 7, -3), ha="right" if left else "left",
                        fontsize=7, color=colours[m])
    for name, colour in (("random-init", "grey"), ("channel-stats", "black")):
        for r in rows:
            if r["encoder"] == name and r["mode"] in ("freeze", "knn") and r["fraction"] == 0.1:
                ax.axhline(r["oa"], color=colour, lw=0.8, ls="-.",
                           label=f"{name} floor 10 %: {r['oa']:.3f}")
    ax.axhline(0.85, color="green", lw=0.6, ls=":", label="target 0.85 (freeze, 10 %)")
    ax.set_xlabel("pre-training minutes (wall clock, per method)")
    ax.set_ylabel("test OA (setting chosen on validation)")
    ax.set_xlim(0, max(minutes, 0.1) * 1.18)
    ax.set_title("EuroSAT RGB: frozen / fine-tuned OA vs pre-training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FLOORS = ("random-init", "channel-stats")


def read_study(folder: Path) -> tuple[dict, list[dict]]:
    """A finished study's summary.json and study.csv rows (numbers as numbers)."""
    summary_path, study_path = folder / "summary.json", folder / "study.csv"
    if not (summary_path.is_file() and study_path.is_file()):
        raise SystemExit(f"--combine: {folder} is not a finished study (no summary.json / "
                         "study.csv): run its command to the end first")
    with open(study_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("minutes", "fraction", "val_oa", "oa", "kappa", "macro_f1"):
            r[k] = float(r[k]) if r.get(k) not in ("", None) else math.nan
    return json.loads(summary_path.read_text()), rows


def combine(out: Path, folders: list[Path]) -> int:
    """One table, plot and summary from studies that pre-trained different methods with the same
    recipe on the same split (the floors are taken from the first study; the others' floors
    are compared with it and the largest test-OA difference is recorded)."""
    studies = [(f, *read_study(f)) for f in folders]
    first, base, rows = studies[0]
    methods: list[str] = []
    pretrain: dict = {}
    floor_diff = 0.0
    floors = {(r["encoder"], r["mode"], r["fraction"]): r["oa"] for r in rows
              if r["encoder"] in FLOORS}
    merged = [r for r in rows if r["encoder"] in FLOORS]
    for folder, summary, study_rows in studies:
        if summary["split"]["digest"] != base["split"]["digest"]:
            raise SystemExit(f"--combine: {folder} used split {summary['split']['digest']}, "
                             f"{first} used {base['split']['digest']}: not comparable")
        if summary["recipe"] != base["recipe"]:
            diff = sorted(k for k in set(summary["recipe"]) | set(base["recipe"])
                          if summary["recipe"].get(k) != base["recipe"].get(k))
            raise SystemExit(f"--combine: {folder} and {first} differ in {', '.join(diff)}: "
                             "methods are compared at the same recipe only")
        clash = set(summary["methods"]) & set(methods)
        if clash:
            raise SystemExit(f"--combine: {', '.join(sorted(clash))} appears in two studies")
        methods += summary["methods"]
        pretrain.update(summary["pretrain"])
        merged += [r for r in study_rows if r["encoder"] not in FLOORS]
        for r in study_rows:
            key = (r["encoder"], r["mode"], r["fraction"])
            if key in floors and not math.isnan(r["oa"]):
                floor_diff = max(floor_diff, abs(r["oa"] - floors[key]))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "study.csv", merged)
    write_table(out / "table.md", merged)
    budget = float(base["budget_minutes"])
    plot(out / "oa_vs_minutes.png", merged, max(p["minutes"] for p in pretrain.values()))
    finals = [f for _, s, _ in studies for f in s["final"] if f["encoder"] not in FLOORS]
    summary = {"budget_minutes": budget, "methods": methods, "recipe": base["recipe"],
               "split": base["split"], "pretrain": pretrain,
               "final": finals + [f for f in base["final"] if f["encoder"] in FLOORS],
               "chosen_on_validation": chosen_on_validation(merged, budget),
               "combined_from": [{"folder": str(f), "command": s["command"]}
                                 for f, s, _ in studies],
               "floor_max_test_oa_difference": round(floor_diff, 4)}
    write_json(out / "summary.json", summary)
    log(f"combined {len(studies)} studies ({', '.join(methods)}) into {out}; floors from "
        f"{first} (largest difference in the others: {floor_diff:.4f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the workers are started with
    out = Path(args.out)
    if args.combine is not None:
        return combine(out, [Path(f) for f in args.combine.split(",") if f])
    out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        pretrain_one(args, args.worker)
        return 0
    from hpcsrl.data.splits import Layout, resolve_split

    t0 = time.perf_counter()
    layout = Layout.read(args.data)
    split = resolve_split(args.split or out / "split.json", layout, {"seed": args.split_seed})
    if Path(split.path) != (out / "split.json").resolve():
        split.save(out / "split.json")
    log(f"split {split.path}: {split.grouping}, test {len(split.test)}, validation "
        f"{len(split.val)}, pool {len(split.pool)} (digest {split.digest()})")
    methods = [m for m in args.methods.split(",") if m]
    chosen = None
    if args.pilot:
        chosen = pilot(args, split)
        write_json(out / "pilot" / "pilot.json", chosen)
        if args.pilot_only:
            return 0
        for k, v in chosen["chosen"].items():
            setattr(args, k, v)
        args.argv += as_argv(chosen["chosen"])
    runs = pretrain_all(args, methods)
    t1 = time.perf_counter()
    rows = evaluate(args, runs)
    write_csv(out / "study.csv", rows)
    write_table(out / "table.md", rows)
    plot(out / "oa_vs_minutes.png", rows, max(r["minutes"] for r in runs.values()))
    finals = {m: at_budget(m, r, args.minutes) for m, r in runs.items()}
    summary = {
        "budget_minutes": args.minutes, "methods": methods, "recipe": recipe(args),
        "split": split.record(),
        "pilot": chosen,
        "pretrain": {m: {k: r[k] for k in ("epochs_planned", "epochs_done", "truncated",
                                            "minutes", "images_per_s", "n_pool_trained")}
                     for m, r in runs.items()},
        "final": [{k: r.get(k) for k in ("encoder", "mode", "fraction", "selected", "val_oa",
                                         "oa", "n_train", "n_test")}
                  for r in rows if r["encoder"] in (*finals.values(), "random-init",
                                                    "channel-stats")],
        "chosen_on_validation": chosen_on_validation(rows, args.minutes),
        "pretrain_wall_s": round(t1 - t0), "eval_wall_s": round(time.perf_counter() - t1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    write_json(out / "summary.json", summary)
    log(f"wrote {out / 'study.csv'}, {out / 'oa_vs_minutes.png'}, {out / 'summary.json'}")
    for r in summary["final"]:
        if r["fraction"] is not None and not math.isnan(float(r["oa"])):
            log(f"  {r['encoder']:<24} {r['mode']:<8} {r['fraction']:.0%}  val OA "
                f"{r['val_oa']:.4f}  test OA {r['oa']:.4f}  [{r['selected']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
