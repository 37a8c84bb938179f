"""`hpcsrl pretrain`: self-supervised pre-training of Lite-SRL or a baseline on a patch HDF5.

Started by a launcher with several ranks (`mpirun -np K`, `srun --mpi=pmix -n K`) it trains data
parallel (hpcsrl.parallel.select: MPI or Horovod); one process trains as before.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, TypeVar

from hpcsrl.errors import UserError
from hpcsrl.parallel.select import BACKENDS

T = TypeVar("T")
METHOD_NAMES = ("lite-srl", "simsiam", "byol", "simclr", "moco-v2", "dual-simclr")
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50")
# = hpcsrl.augment.views.AUGMENT_PRESETS (spelled out so --help stays torch-free; a test checks)
AUGMENT_NAMES = ("chips", "chips-native", "chips-mild", "paper")
# = hpcsrl.models.resnet.STEMS (spelled out for the same reason)
STEM_NAMES = ("imagenet", "small", "mid")
STEM_HELP = ("ResNet stem: imagenet (7x7/2 + max-pool, default), small (3x3/1, no max-pool: 8x8 "
             "cells from a 64-px chip instead of 2x2, ~16x the compute) or mid (3x3/2, no "
             "max-pool: 4x4 cells, ~4x); recorded in the model config")
# = hpcsrl.precision.PRECISIONS (spelled out for the same reason)
PRECISION_NAMES = ("fp32", "bf16")
# Set by mpirun / srun / horovodrun: several processes then share the node's cores.
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID", "SLURM_JOB_ID",
                 "HOROVOD_RANK")


def default_threads() -> int:
    """1 compute thread under MPI/Slurm (ranks share cores), else every core."""
    if any(v in os.environ for v in LAUNCHER_VARS):
        return 1
    return os.cpu_count() or 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="patch HDF5 written by hpcsrl-preprocess")
    p.add_argument("--bands", default="rgb",
                   help="band set: rgb, s2-10m, s2, s1, s1s2 (default rgb)")
    p.add_argument("--method", default="lite-srl",
                   help=f"one of {', '.join(METHOD_NAMES)} (default lite-srl)")
    p.add_argument("--backbone", default="resnet18",
                   help=f"one of {', '.join(BACKBONE_NAMES)} (default resnet18)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="patches per step over all ranks: K ranks train on batch/K each "
                   "(default 64)")
    p.add_argument("--input-size", type=int, default=64,
                   help="side of the augmented views in pixels (default 64); smaller views "
                   "train faster (32 on 64-px chips: ~3.5x per step) and --precise-bn adapts the "
                   "encoder back to full-size patches")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.csv")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (starts fresh when there is none)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.05 x batch / 256 = 0.05 x K x n / 256 for "
                   "K ranks of n patches)")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="SGD weight decay (default 1e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads (default 1 under MPI/Slurm, else all cores)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader reader processes (default 0: read in this process)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds model init, data order and augmentations (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use at most N patches")
    p.add_argument("--monitor-samples", type=int, default=512,
                   help="patches for the collapse / k-NN monitor (half held out when labelled)")
    p.add_argument("--augment", default="chips", choices=AUGMENT_NAMES,
                   help="view strength: chips (default: the paper's crop and colour ops without "
                   "the blur that wipes out texture on small chips), chips-native (crops of "
                   "15-50 %% of the patch, so 32-px views of 64-px chips keep their ground "
                   "resolution), chips-mild (half the colour jitter, no hue turn or grayscale: "
                   "keeps the colour that separates land-cover classes) or paper (its 224-px "
                   "recipe)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="head/loss option of the method, repeatable (e.g. proj_out_relu=1 for "
                   "the paper-literal Lite-SRL projector); see hpcsrl.models.registry")
    p.add_argument("--precise-bn", type=int, default=2048, metavar="N",
                   help="after each epoch, re-estimate BatchNorm statistics on N clean training "
                   "patches so eval-mode features match un-augmented inputs (default 2048, 0: off)")
    p.add_argument("--in-memory", action="store_true",
                   help="read all patches into memory once (float32: 4 x bands x size^2 bytes "
                   "each) instead of an HDF5 read per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_shape_arguments(p)
    add_precision_argument(p)
    p.add_argument("--pretrain-on", choices=("pool", "all"), default="pool",
                   help="pool (default): never read the test or validation patches of the split; "
                   "all: include them deliberately (recorded in the checkpoint)")
    add_split_arguments(p)
    add_parallel_arguments(p, schedule="cosine")


def add_shape_arguments(p: argparse.ArgumentParser, note: str = "") -> None:
    """--stem and --width: the ResNet's shape, recorded in the model config (`note` ends both
    helps, e.g. which model they apply to)."""
    p.add_argument("--stem", choices=STEM_NAMES, default="imagenet", help=STEM_HELP + note)
    p.add_argument("--width", type=int, default=64,
                   help="channels of the ResNet's first stage, doubling per stage (default 64; 32 "
                   "costs about a third per image, so a budget trains ~3x the epochs)" + note)


def shape_options(args: argparse.Namespace) -> dict[str, Any]:
    """The non-default --stem/--width as build_method options (defaults stay out of configs)."""
    options: dict[str, Any] = {}
    if args.stem != "imagenet":
        options["stem"] = args.stem
    if args.width != 64:
        options["width"] = args.width
    return options


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32",
                   help="forward passes in fp32 (default) or bf16 autocast: about 2x faster on "
                   "CPUs with native bfloat16 (AVX-512 BF16 / AMX), refused on others; weights, "
                   "gradients and losses stay fp32")


def add_parallel_arguments(p: argparse.ArgumentParser, schedule: str,
                           nesterov: str = "on with several ranks, off alone") -> None:
    """The LR recipe and data-parallel options shared by `hpcsrl pretrain` and `hpcsrl train`."""
    g = p.add_argument_group(
        "learning-rate recipe and data parallelism",
        "Under a launcher with K > 1 ranks (mpirun -np K, srun --mpi=pmix -n K) training is data "
        "parallel: each rank takes batch/K patches of every step, gradients are averaged by "
        "ring-allreduce, rank 0 writes. Then, unless set here: linear warm-up from lr/K, "
        "Nesterov.")
    g.add_argument("--data-parallel", default="auto", choices=BACKENDS,
                   help="who averages the gradients: mpi (the training thread, one flat "
                   "ring-allreduce after backward), horovod (Horovod's DistributedOptimizer, "
                   "overlapping backward from its background thread), auto (default: mpi when "
                   "the node's ranks x threads fill its cores, else horovod)")
    g.add_argument("--schedule", default=schedule, choices=("cosine", "step"),
                   help=f"after the warm-up: cosine decay to 0, or x0.1 at --decay-epochs "
                   f"(default {schedule})")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warm-up from lr/K to lr (default: 0 alone, else min(5, epochs/10))")
    g.add_argument("--decay-epochs", default=None, metavar="E1,E2,...",
                   help="--schedule step: epochs after which lr is x0.1 (default 30,60,80 %% of "
                   "--epochs, as the seed's 30,60,80 of 100)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum (default: {nesterov})")
    g.add_argument("--batches-per-allreduce", type=int, default=1, metavar="N",
                   help="split each rank's part of a step into N micro-batches whose gradients "
                   "add up before one allreduce (BatchNorm sees micro-batches; multiply "
                   "--batch-size by N to keep the micro-batch and send N x fewer bytes per "
                   "image; default 1)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over all ranks' batches (for small per-rank batches)")
    g.add_argument("--fp16-allreduce", action="store_true",
                   help="send gradients as float16 (half the bytes; rounding differs)")


def parse_decay_epochs(text: str | None, epochs: int) -> list[int] | None:
    """'30,60,80' -> [30, 60, 80]; each must lie in 1..epochs-1."""
    if text is None:
        return None
    try:
        marks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--decay-epochs {text!r}: expected comma-separated epochs, e.g. "
                        "30,60,80") from None
    if not marks or marks[0] < 1 or marks[-1] >= epochs:
        raise UserError(f"--decay-epochs {text!r}: each epoch must lie in 1..{epochs - 1}")
    return marks


def parse_method_options(method: str, items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> options typed like the method's defaults (bool, int, float, str)."""
    from hpcsrl.models.registry import METHODS, method_options

    valid = method_options(method) if method in METHODS else {}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in valid:
            raise UserError(f"--method-option {item!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(valid) or 'none'} for --method {method}")
        kind = type(valid[key])
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                out[key] = text.lower() in ("1", "true", "yes")
            else:
                out[key] = kind(text)
        except ValueError:
            raise UserError(f"--method-option {item!r}: {text!r} is not a valid "
                            f"{kind.__name__}") from None
    return out


def start_training(args: argparse.Namespace, check: Callable[[argparse.Namespace], T]
                   ) -> tuple[T, Any] | None:
    """What every training command does first, alone or under a launcher: check the options
    (every rank finds the same mistake; rank 0 raises it, the others get None and exit 2), set
    the compute threads, and start the distribution (data parallel when several ranks run)."""
    from hpcsrl.log import launcher_rank

    try:
        checked = check(args)
    except UserError:
        if launcher_rank() != 0:
            return None
        raise
    import torch

    from hpcsrl.parallel.select import make_distribution

    torch.set_num_threads(args.threads if args.threads is not None else default_threads())
    return checked, make_distribution(sync_bn=args.sync_bn, fp16_allreduce=args.fp16_allreduce,
                                      backend=args.data_parallel)


def run(args: argparse.Namespace) -> int:
    started = start_training(args, check_arguments)
    if started is None:
        return 2
    (options, decay), dist = started
    from hpcsrl.train.distribution import RankStopped, everywhere
    from hpcsrl.train.lock import RunLock
    from hpcsrl.train.loop import PretrainConfig, Pretrainer

    options.update(shape_options(args))  # backbone options: build_method records them
    cfg = PretrainConfig(method=args.method, backbone=args.backbone, bands=args.bands,
                         epochs=args.epochs, batch_size=args.batch_size,
                         input_size=args.input_size, lr=args.lr, weight_decay=args.weight_decay,
                         momentum=args.momentum, seed=args.seed, workers=args.workers,
                         limit=args.limit, monitor_samples=args.monitor_samples,
                         progress=not args.no_progress, method_options=options,
                         augment=args.augment, precise_bn=args.precise_bn,
                         in_memory=args.in_memory, nesterov=args.nesterov,
                         schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                         decay_epochs=decay, batches_per_allreduce=args.batches_per_allreduce,
                         precision=args.precision)
    # The folder lock comes first: a run refused because another one holds OUT must not read or
    # write OUT/split.json (the trainer re-takes the same lock, re-entrantly, and releases it).
    lock = RunLock(args.out)

    def dataset() -> Any:
        if dist.is_writer:
            lock.acquire()
        return pretrain_dataset(args, write_split=dist.is_writer)

    try:
        ds = everywhere(dist, dataset)
        trainer = Pretrainer(ds, cfg, args.out, resume=args.resume, dist=dist)
        log_split(ds)  # after the set-up checks: a refused run prints its one error line only
        trainer.run()
    except RankStopped:
        return 2  # another rank failed; rank 0 printed why
    finally:
        lock.release()
    return 0


def check_arguments(args: argparse.Namespace) -> tuple[dict[str, Any], list[int] | None]:
    """Option checks that need no data: (method options, decay epochs) or a UserError."""
    if args.method not in METHOD_NAMES:
        raise UserError(f"--method {args.method!r} is unknown: choose one of "
                        f"{', '.join(METHOD_NAMES)}")
    if args.backbone not in BACKBONE_NAMES:
        raise UserError(f"--backbone {args.backbone!r} is unknown: choose one of "
                        f"{', '.join(BACKBONE_NAMES)}")
    for name in ("epochs", "batch_size", "input_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (BatchNorm and the losses need pairs)")
    if args.input_size < 32:
        raise UserError("--input-size must be at least 32 (ResNet down-samples 32x)")
    if args.limit is not None and args.limit < 2:
        raise UserError("--limit must be at least 2")
    if args.precise_bn < 0:
        raise UserError("--precise-bn must be 0 (off) or a number of patches")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.warmup_epochs is not None and not 0 <= args.warmup_epochs < args.epochs:
        raise UserError(f"--warmup-epochs must lie in 0..{args.epochs - 1}")
    if args.batches_per_allreduce < 1:
        raise UserError("--batches-per-allreduce must be at least 1")
    return (parse_method_options(args.method, args.method_option),
            parse_decay_epochs(args.decay_epochs, args.epochs))


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    """The split options shared by `hpcsrl pretrain`, `hpcsrl dhp` and `hpcsrl evaluate`
    (hpcsrl.data.splits)."""
    g = p.add_argument_group(
        "test / validation / pool split",
        "One split.json per file and seed: pre-training and BatchNorm statistics read the pool "
        "only, choices are made on the validation part, the test part is only scored.")
    g.add_argument("--split", default=None, metavar="SPLIT.json",
                   help="split file to reuse (refused when drawn for another file), or to draw "
                   "and write when absent (default: OUT/split.json, or the checkpoint's)")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed of a new split (default 0)")
    g.add_argument("--test-fraction", type=float, default=None,
                   help="share of the labelled patches held out for test in a new split "
                   "(default 0.2)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="share held out for validation in a new split (default 0.1)")


def split_options(args: argparse.Namespace) -> dict[str, Any]:
    """The split options the user set (the rest: the recorded split's or the defaults)."""
    return {"seed": args.split_seed, "test_fraction": args.test_fraction,
            "val_fraction": args.val_fraction}


def pretrain_dataset(args: argparse.Namespace, write_split: bool = True):
    """The patches pre-training may read: the split's pool (test and validation never), or all
    of them with --pretrain-on all; the split is recorded in the checkpoint's data fingerprint."""
    from pathlib import Path

    from hpcsrl.data.splits import pretraining_patches

    return pretraining_patches(args.data, args.bands, args.split or Path(args.out) / "split.json",
                               split_options(args), args.pretrain_on, write=write_split)


def log_split(ds) -> None:
    """Say which part of which split the run reads (it is also in the checkpoint)."""
    from hpcsrl.data.splits import pretraining_message
    from hpcsrl.log import get_logger

    get_logger("hpcsrl.pretrain").info("%s", pretraining_message(ds.split_record, len(ds)))
