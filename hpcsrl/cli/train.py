"""`hpcsrl train`: supervised multi-label classification of the HDF5 `classes` with a ResNet,
in one process or data parallel under a launcher (as `hpcsrl pretrain`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcsrl.cli.pretrain import (
    BACKBONE_NAMES,
    add_parallel_arguments,
    add_precision_argument,
    add_split_arguments,
    parse_decay_epochs,
    split_options,
    start_training,
)
from hpcsrl.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="patch HDF5 with a `classes` dataset")
    p.add_argument("--bands", default="s2", help="band set: rgb, s2-10m, s2, s1, s1s2 (default s2)")
    p.add_argument("--backbone", default="resnet50",
                   help=f"one of {', '.join(BACKBONE_NAMES)} (default resnet50, as the seed)")
    p.add_argument("--epochs", type=int, default=100, help="passes over the pool (default 100)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="patches per step over all ranks (default 64)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.csv, "
                   "test_f1.csv, split.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start the backbone from a `hpcsrl pretrain` checkpoint (same backbone "
                   "and band count)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.1 x batch / 256, the seed's rule)")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="L2 on convolution and classifier weights (default 1e-4)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--dropout", type=float, default=0.5, help="before the classifier (0.5)")
    p.add_argument("--mixup", type=float, default=0.2,
                   help="mix-up Beta(a, a) parameter a (default 0.2; 0: off)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="sigmoid output above which a class counts as present (default 0.5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads (default 1 under MPI/Slurm, else all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_precision_argument(p)
    add_split_arguments(p)
    add_parallel_arguments(p, schedule="step", nesterov="on, as the seed")


def check_arguments(args: argparse.Namespace) -> list[int] | None:
    if args.backbone not in BACKBONE_NAMES:
        raise UserError(f"--backbone {args.backbone!r} is unknown: choose one of "
                        f"{', '.join(BACKBONE_NAMES)}")
    if args.epochs < 1 or args.batch_size < 2:
        raise UserError("--epochs must be at least 1 and --batch-size at least 2")
    if not 0 <= args.dropout < 1 or args.mixup < 0 or not 0 < args.threshold < 1:
        raise UserError("--dropout must lie in [0, 1), --mixup >= 0, --threshold in (0, 1)")
    if args.warmup_epochs is not None and not 0 <= args.warmup_epochs < args.epochs:
        raise UserError(f"--warmup-epochs must lie in 0..{args.epochs - 1}")
    if args.batches_per_allreduce < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--batches-per-allreduce and --threads must be at least 1")
    return parse_decay_epochs(args.decay_epochs, args.epochs)


def open_data(args: argparse.Namespace, write_split: bool):
    """(dataset over the whole file, the split recorded in OUT/split.json or --split)."""
    from hpcsrl.data import PatchDataset
    from hpcsrl.data.splits import Layout, resolve_split

    ds = PatchDataset(args.data, bands=args.bands)
    if ds.multi_hot is None:
        raise UserError(f"{args.data}: no `classes` dataset (multi-label targets, N x K 0/1): "
                        "hpcsrl train needs a file made from labelled scenes (BigEarthNet, or "
                        "hpcsrl synth --classes)")
    path = Path(args.split or Path(args.out) / "split.json")
    try:
        split = resolve_split(path, Layout.read(args.data), split_options(args),
                              write=write_split)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write {path.name} there ({exc.strerror}): "
                        "choose a writable --out (or --split)") from None
    return ds, split


def run(args: argparse.Namespace) -> int:
    started = start_training(args, check_arguments)
    if started is None:
        return 2  # every rank finds the same mistake: rank 0 alone says it
    decay, dist = started
    from hpcsrl.train.classify import ClassifyConfig, ClassTrainer
    from hpcsrl.train.distribution import RankStopped, everywhere

    cfg = ClassifyConfig(backbone=args.backbone, bands=args.bands, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         momentum=args.momentum,
                         nesterov=True if args.nesterov is None else args.nesterov,
                         schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                         decay_epochs=decay, dropout=args.dropout, mixup=args.mixup,
                         seed=args.seed, threshold=args.threshold,
                         progress=not args.no_progress,
                         batches_per_allreduce=args.batches_per_allreduce,
                         precision=args.precision)
    try:
        ds, split = everywhere(dist, lambda: open_data(args, write_split=dist.is_writer))
        ClassTrainer(ds, split, cfg, args.out, resume=args.resume, init=args.init,
                     dist=dist).run()
    except RankStopped:
        return 2  # another rank failed; rank 0 printed why
    return 0
