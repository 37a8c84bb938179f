"""SSL method comparison at equal backbone, batch and input size (the paper's Fig. 7 / Table 2-3).

Per method: parameters, time per training iteration (all methods timed round-robin in one
process, median), peak training memory (max-RSS growth in a fresh subprocess per method) and
freeze / fine-tune accuracy after an equal short pre-training budget. Writes a CSV with ratios
against SimSiam and a bubble chart (x = time/iteration, y = accuracy, bubble area = memory).

    python benchmarks/ssl_compare/main.py --data X.h5 --bands rgb            # quick: minutes
    python benchmarks/ssl_compare/main.py --data X.h5 --pretrain-epochs 20 --pretrain-samples 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("lite-srl", "simsiam", "byol", "simclr", "moco-v2")
REFERENCE = "simsiam"
# Issue 3 targets for Lite-SRL against SimSiam with the same backbone.
TARGETS = {"params": 0.57, "iter": 0.8, "mem": 0.8, "acc_points": 1.0}
COLUMNS = ("method", "params_m", "params_ratio", "iter_ms", "iter_ratio", "iter_min_ms",
           "iter_min_ratio", "mem_mb", "mem_ratio",
           "freeze_10", "freeze_20", "finetune_10", "finetune_20", "freeze_20_vs_ref_points",
           "finetune_20_vs_ref_points", "pretrain_s", "final_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="labelled patch HDF5 (e.g. EuroSAT RGB via hpcsrl-preprocess)")
    p.add_argument("--bands", default="rgb", help="band set (rgb, s2-10m, s2, s1)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64, help="same batch for every method")
    p.add_argument("--input-size", type=int, default=32,
                   help="view side (px), same for all (default 32: the EuroSAT recipe)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per method")
    p.add_argument("--rounds", type=int, default=9, help="timed round-robin iterations per method")
    p.add_argument("--memory-steps", type=int, default=3, help="training steps per memory probe")
    p.add_argument("--pretrain-epochs", type=int, default=1, help="equal budget for every method")
    p.add_argument("--lr", type=float, default=None,
                   help="pre-training base lr for every method (default: the trainer's)")
    p.add_argument("--augment", default="chips", help="augmentation preset for every method")
    p.add_argument("--pretrain-samples", type=int, default=512,
                   help="patches used for pre-training (0 = all)")
    p.add_argument("--eval-samples", type=int, default=1500,
                   help="stratified subsample for the evaluation (0 = all labelled)")
    p.add_argument("--label-fractions", default="0.1,0.2")
    p.add_argument("--split", default=None,
                   help="split.json to reuse (default: WORK_DIR/split.json, drawn on first use)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs")
    p.add_argument("--skip-accuracy", action="store_true", help="only params, time and memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"), help="folder for ssl_compare.* files")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "hpcsrl-ssl-compare"),
                   help="checkpoints and evaluation plots (large; kept out of the repository); "
                   "a finished pre-training with the same budget is reused")
    p.add_argument("--probe-memory", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--channels", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def max_rss_mb() -> float:
    """Peak resident set size of this process image so far, in MiB.

    Linux's VmHWM belongs to the current address space; getrusage's ru_maxrss would also carry
    the parent's peak across fork + exec (the benchmark parent holds all five models).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_step(model, opt, x_a, x_b, progress: float) -> float:
    """One optimiser step exactly as the trainer does it (loss, backward, step, momentum update)."""
    loss = model(x_a, x_b)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    model.after_step(progress=progress)
    return float(loss.detach())


def make_optimizer(model, batch_size: int):
    import torch

    from hpcsrl.schedules import default_lr

    return torch.optim.SGD(model.parameters(), lr=default_lr(batch_size), momentum=0.9,
                           weight_decay=1e-4)


def probe_memory(args: argparse.Namespace) -> None:
    """Subprocess body: peak RSS growth of building and training one method (prints JSON)."""
    import torch

    from hpcsrl.models.registry import build_method

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = (args.batch_size, args.channels, args.input_size, args.input_size)
    x_a, x_b = torch.randn(shape), torch.randn(shape)
    x_a.add_(0), x_b.add_(0)  # touch the pages so the inputs count in the baseline
    base = max_rss_mb()
    model = build_method(args.probe_memory, args.backbone, args.channels)
    model.train()
    opt = make_optimizer(model, args.batch_size)
    for i in range(args.memory_steps):
        train_step(model, opt, x_a, x_b, (i + 1) / args.memory_steps)
    print(json.dumps({"method": args.probe_memory, "base_mb": base,
                      "mem_mb": max_rss_mb() - base}))


def measure_memory(args: argparse.Namespace, channels: int) -> dict[str, float]:
    """One fresh interpreter per method so that no allocator state carries over."""
    out = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for m in args.methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory", m,
               "--channels", str(channels), "--batch-size", str(args.batch_size),
               "--input-size", str(args.input_size), "--backbone", args.backbone,
               "--memory-steps", str(args.memory_steps), "--threads", str(args.threads),
               "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe of {m} failed:\n{proc.stderr[-2000:]}")
        out[m] = json.loads(proc.stdout.strip().splitlines()[-1])["mem_mb"]
        print(f"  memory {m:10s} {out[m]:8.1f} MB", flush=True)
    return out


def sample_batch(args: argparse.Namespace):
    """A batch of real patches (or noise without --data) and the two views every method sees."""
    import numpy as np
    import torch

    if args.data is None:
        shape = (args.batch_size, args.channels, args.input_size, args.input_size)
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn(shape, generator=g), torch.randn(shape, generator=g), args.channels
    from hpcsrl.augment.views import make_view_transform, two_views
    from hpcsrl.data import PatchDataset
    from hpcsrl.train.loop import band_stats

    ds = PatchDataset(args.data, bands=args.bands)
    idx = np.sort(np.random.default_rng(args.seed).choice(len(ds), args.batch_size,
                                                          replace=len(ds) < args.batch_size))
    x = ds.read_batch(idx)[0]
    mean, std = band_stats(ds)
    tf = make_view_transform(ds.sensor, ds.band_names, args.input_size, mean=mean, std=std,
                             augment=args.augment)
    x_a, x_b = two_views(tf, x, torch.Generator().manual_seed(args.seed))
    return x_a, x_b, ds.channels


def measure_params_and_time(args: argparse.Namespace, x_a, x_b, channels: int
                            ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Build every method, then time training steps round-robin (same load for all).

    Returns parameters (M) and each method's per-iteration times (ms). Interleaving the methods
    spreads load from other processes evenly; the report uses the median and also the minimum.

    Views are made once: the time is the model's (forward, backward, optimiser, momentum update),
    not the augmentation's, which is identical for every method.
    """
    import torch

    from hpcsrl.models.registry import build_method

    models, opts, params = {}, {}, {}
    for m in args.methods:
        torch.manual_seed(args.seed)
        models[m] = build_method(m, args.backbone, channels).train()
        opts[m] = make_optimizer(models[m], args.batch_size)
        params[m] = models[m].n_parameters() / 1e6
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    total = args.warmup + args.rounds
    for r in range(total):
        for m in args.methods:
            t = time.perf_counter()
            train_step(models[m], opts[m], x_a, x_b, (r + 1) / total)
            if r >= args.warmup:
                times[m].append(time.perf_counter() - t)
        print(f"  timing round {r + 1}/{total}", flush=True)
    return params, {m: [1000 * t for t in v] for m, v in times.items()}


def measure_accuracy(args: argparse.Namespace, work: Path) -> tuple[list[dict], dict[str, dict]]:
    """Equal pre-training budget per method, then one shared evaluation (features read once)."""
    import torch

    from hpcsrl.data import PatchDataset
    from hpcsrl.data.splits import Layout, SplitPatches, resolve_split
    from hpcsrl.eval.protocol import EvalSpec, LabelledData, run_protocol
    from hpcsrl.eval.train import FitConfig
    from hpcsrl.log import get_logger
    from hpcsrl.models.registry import build_method, model_from_checkpoint
    from hpcsrl.train.loop import PretrainConfig, Pretrainer

    log = get_logger("ssl_compare")
    ds = PatchDataset(args.data, bands=args.bands)
    if not ds.has_labels:
        sys.exit(f"ssl_compare: error: {args.data} has no labels; accuracy needs a labelled file "
                 "(or pass --skip-accuracy)")
    # the project's protocol: pre-training reads the pool only; the probe's choices are made on
    # the validation part and the test part is scored once (split recorded in the work folder)
    work.mkdir(parents=True, exist_ok=True)
    split = resolve_split(args.split or work / "split.json", Layout.read(args.data))
    pool = SplitPatches(args.data, args.bands, split)
    log.info("split %s: test %d, validation %d, pool %d (pre-training reads the pool only)",
             split.path, len(split.test), len(split.val), len(split.pool))
    encoders, info = {}, {}
    for m in args.methods:
        cfg = PretrainConfig(method=m, backbone=args.backbone, bands=args.bands,
                             epochs=args.pretrain_epochs, batch_size=args.batch_size,
                             input_size=args.input_size, seed=args.seed,
                             limit=args.pretrain_samples or None, monitor_samples=256,
                             lr=args.lr, augment=args.augment, in_memory=True,
                             progress=sys.stderr.isatty())
        # the folder names the budget and hashes every model and trainer setting, so a cached
        # pre-training is only reused for exactly the same run (changed defaults start afresh)
        settings = {**asdict(cfg), "progress": None, "split": split.digest(),
                    "model": build_method(m, args.backbone, ds.channels).config}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        budget = (f"e{args.pretrain_epochs}_n{args.pretrain_samples}_b{args.batch_size}"
                  f"_s{args.input_size}_seed{args.seed}_{digest.hexdigest()[:8]}")
        run_dir = work / "runs" / args.bands / f"{m}_{budget}"
        ckpt_path = run_dir / "checkpoint.pt"
        history = Pretrainer(pool, cfg, run_dir, resume=True).run()
        # from the epoch log, so a reused pre-training still reports what it cost
        info[m] = {"pretrain_s": sum(float(h["seconds"]) for h in history),
                   "final_loss": history[-1]["loss"] if history else float("nan")}
        model, _ = model_from_checkpoint(ckpt_path)
        encoders[m] = model.encoder
        print(f"  pre-trained {m}: loss {info[m]['final_loss']:.4f}", flush=True)
    torch.manual_seed(args.seed)
    encoders["random-init"] = build_method(REFERENCE, args.backbone, ds.channels).encoder
    fractions = tuple(float(f) for f in args.label_fractions.split(","))
    spec = EvalSpec(modes=("freeze", "finetune"), fractions=fractions, seed=args.seed,
                    max_samples=args.eval_samples or None, tsne=False,
                    fit=FitConfig(epochs=args.probe_epochs, finetune_epochs=args.finetune_epochs,
                                  seed=args.seed, progress=False))
    rows = run_protocol(LabelledData(lambda i: ds.read_batch(i)[0], ds.labels,
                                     list(ds.class_names)), encoders, spec, work / "eval", log,
                        split=split)
    return rows, info


def ratio(values: dict[str, float], m: str) -> float | None:
    ref = values.get(REFERENCE)
    return values[m] / ref if ref and m in values else None


def build_table(args, params, iter_ms, iter_min, mem, acc_rows, info) -> list[dict]:
    acc: dict[tuple[str, str, float], float] = {
        (r["encoder"], r["mode"], round(r["fraction"], 3)): r["oa"] for r in acc_rows}

    def oa(enc: str, mode: str, f: float) -> float | None:
        v = acc.get((enc, mode, f))
        return None if v is None else 100 * v

    rows = []
    for m in args.methods:
        row = {"method": m, "params_m": params[m], "params_ratio": ratio(params, m),
               "iter_ms": iter_ms[m], "iter_ratio": ratio(iter_ms, m),
               "iter_min_ms": iter_min[m], "iter_min_ratio": ratio(iter_min, m), "mem_mb": mem[m],
               "mem_ratio": ratio(mem, m), **info.get(m, {})}
        for mode in ("freeze", "finetune"):
            for f in (0.1, 0.2):
                row[f"{mode}_{round(f * 100)}"] = oa(m, mode, f)
            mine, ref = oa(m, mode, 0.2), oa(REFERENCE, mode, 0.2)
            row[f"{mode}_20_vs_ref_points"] = None if mine is None or ref is None else mine - ref
        rows.append(row)
    for enc, mode in (("random-init", "freeze"), ("random-init", "finetune"),
                      ("channel-stats", "knn")):
        if any(k[0] == enc for k in acc):
            row = {"method": f"{enc} ({mode})"}
            for f in (0.1, 0.2):
                for col_mode in ("freeze", "finetune"):
                    if mode in (col_mode, "knn"):
                        row[f"{col_mode}_{round(f * 100)}"] = oa(enc, mode, f)
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcsrl.eval.plots import save_figure

    methods = [r for r in rows if r.get("iter_ms") is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    y_key = "freeze_20"
    have_acc = any(r.get(y_key) is not None for r in methods)
    biggest = max(r["mem_mb"] for r in methods)
    for i, r in enumerate(methods):
        y = r.get(y_key) if have_acc else r["params_m"]
        size = 2500 * r["mem_mb"] / biggest
        ax.scatter(r["iter_ms"], y, s=size, alpha=0.45, color=plt.get_cmap("tab10")(i),
                   edgecolors="black", linewidths=0.8)
        ax.annotate(f"{r['method']}\n{r['mem_mb']:.0f} MB", (r["iter_ms"], y), fontsize=8,
                    ha="center", va="center")
    if have_acc:
        for r in rows:
            if r["method"].startswith(("random-init (freeze)", "channel-stats")):
                v = r.get(y_key)
                if v is not None:
                    ax.axhline(v, ls="--", lw=0.8, color="grey")
                    ax.text(ax.get_xlim()[0], v, f" {r['method']}", fontsize=7, va="bottom",
                            color="grey")
    ax.set_xlabel("time per training iteration (ms)")
    ax.set_ylabel("freeze OA at 20 % labels (%)" if have_acc else "parameters (M)")
    ax.set_title(title, fontsize=9)
    ax.margins(0.25)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_memory:
        probe_memory(args)
        return 0
    if not args.skip_accuracy and not args.data:
        sys.exit("ssl_compare: error: --data is required for accuracy (or --skip-accuracy)")
    import torch

    from hpcsrl.eval.report import REPORT_COLUMNS, format_table, write_csv
    from hpcsrl.fileio import write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_a, x_b, channels = sample_batch(args)
    print(f"timing {len(args.methods)} methods round-robin (batch {args.batch_size}, "
          f"{channels}x{args.input_size}x{args.input_size})", flush=True)
    params, iter_times = measure_params_and_time(args, x_a, x_b, channels)
    iter_ms = {m: statistics.median(v) for m, v in iter_times.items()}
    iter_min = {m: min(v) for m, v in iter_times.items()}
    print("memory (fresh process per method)", flush=True)
    mem = measure_memory(args, channels)
    acc_rows, info = ([], {}) if args.skip_accuracy else measure_accuracy(args, Path(args.work_dir))
    rows = build_table(args, params, iter_ms, iter_min, mem, acc_rows, info)
    write_csv(out / "ssl_compare.csv", rows, COLUMNS)
    if acc_rows:
        write_csv(out / "ssl_compare_runs.csv", acc_rows, REPORT_COLUMNS)
    settings = {k: v for k, v in vars(args).items() if k not in ("probe_memory", "channels")}
    write_json(out / "ssl_compare.json", {
        **settings, "channels": channels, "torch": torch.__version__,
        "iteration_ms": {m: [round(t, 1) for t in v] for m, v in iter_times.items()},
        "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
        "wall_seconds": round(time.perf_counter() - t0, 1)})
    budget = ("no pre-training" if args.skip_accuracy else
              f"{args.pretrain_epochs} ep x {args.pretrain_samples or 'all'} patches")
    plot(rows, out / "ssl_compare.png",
         f"{args.backbone}, batch {args.batch_size}, {args.input_size}px {args.bands}; "
         f"{budget}; bubble area = peak training memory")
    print(format_table(rows, COLUMNS))
    print(f"wrote {out / 'ssl_compare.csv'} and {out / 'ssl_compare.png'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from hpcsrl.errors import UserError

    try:
        sys.exit(main())
    except UserError as exc:
        sys.exit(f"ssl_compare: error: {exc}")
