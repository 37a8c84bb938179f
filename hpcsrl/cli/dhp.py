"""`hpcsrl dhp`: hybrid-parallel pipeline training (DHP) of a CWB plan over MPI ranks."""

from __future__ import annotations

import argparse

EPILOG = """Start it with one rank per plan replica, e.g. for a 3/2/1 plan:
  mpirun -np 6 hpcsrl dhp --plan plan.json --data patches.h5 --bands s2 --out RUN --iterations 1000
  srun --mpi=pmix -n 6 hpcsrl dhp ...            (see slurm/dhp.sbatch, slurm/tx2/run_dhp.sh)
Ranks are laid out stage by stage (3/2/1: ranks 0-2 stage 0, 3-4 stage 1, 5 stage 2); rank 0 also
runs the scheduler and writes RUN/checkpoint.pt (every --aggregate-every iterations, in the format
of hpcsrl pretrain), RUN/dhp_report.json, RUN/dhp_ranks.csv and RUN/dhp_assignment.csv."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hpcsrl.cli.pretrain import AUGMENT_NAMES, add_split_arguments

    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--plan", required=True, help="plan.json from `hpcsrl plan` (stages, replicas)")
    p.add_argument("--data", default=None,
                   help="patch HDF5 written by hpcsrl-preprocess (required unless --emulate)")
    p.add_argument("--out", required=True, help="run folder (checkpoint, report, assignment)")
    p.add_argument("--bands", default="rgb", help="band set: rgb, s2-10m, s2, s1, s1s2")
    p.add_argument("--chains", choices=("dynamic", "fixed"), default="dynamic",
                   help="dynamic: each mini-batch forms its own chain (default); fixed: chain c "
                   "is replica c of every stage (needs equal replicas)")
    n = p.add_mutually_exclusive_group(required=True)
    n.add_argument("--iterations", type=int, help="mini-batches to train in all")
    n.add_argument("--epochs", type=int, help="passes over the training patches")
    p.add_argument("--aggregate-every", type=int, default=100, metavar="K",
                   help="average stage replicas and checkpoint every K iterations (default 100)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (any plan / rank count)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop at the first aggregation at or after iteration N (a job's time "
                   "limit); --resume continues")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds of silence after which a rank counts as failed (default 30)")
    p.add_argument("--memory", default=None,
                   help="memory per node (e.g. 3GiB): refuse a plan whose stage needs more")
    p.add_argument("--method", default=None, help="must match the plan's (default: the plan's)")
    p.add_argument("--backbone", default=None, help="must match the plan's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the plan's")
    p.add_argument("--input-size", type=int, default=None, help="default: the plan's")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate (default 0.05 x batch / 256), cosine by iteration")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most N patches")
    p.add_argument("--monitor-samples", type=int, default=512,
                   help="as in hpcsrl pretrain: labelled monitor patches held out of training")
    p.add_argument("--augment", default="chips", choices=AUGMENT_NAMES)
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pretrain-on", choices=("pool", "all"), default="pool",
                   help="as in hpcsrl pretrain: pool (default) never reads the split's test or "
                   "validation patches; all includes them (recorded in the checkpoint)")
    add_split_arguments(p)
    p.add_argument("--wait", choices=("poll", "block"), default="poll",
                   help="poll: Test() with a back-off sleep (default; never spins a core); "
                   "block: MPI's blocking waits (combine with --mca mpi_yield_when_idle 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--emulate", default=None, metavar="PROFILE",
                   help="sleep the profile's forward/backward times and send tensors of its cut "
                   "sizes instead of computing (no data, model or checkpoint; --iterations only)")
    p.add_argument("--time-scale", default="1", metavar="S",
                   help="--emulate: multiply every profiled time by S (default 1)")
    p.add_argument("--slowdown", action="append", default=[], metavar="RANK=F",
                   help="--emulate: that rank's times are F times longer (repeatable)")


# OpenMPI's default non-blocking reduce (libnbc "chain") moves a large message in small segments
# that each need a Test() from both sides: under the runtime's polled waits a stage's 10.8 MB
# state took 2.9 s to aggregate, 0.011 s with the binomial algorithm (benchmarks/dhp/common.py).
# Set before mpi4py initialises MPI; a value the user exported wins.
# THP_MEM_ALLOC_ENABLE: torch's CPU allocator backs tensors of 2 MB and more with transparent
# huge pages (this kernel's THP mode is `madvise`; numpy advises its own large arrays). A 64 MB
# activation then crosses shared memory at ~6 GB/s instead of ~3.8 GB/s (fewer pages for the
# single-copy transfer to pin; benchmarks/dhp_transfer). Read at torch's first allocation, so
# it is set before torch is imported.
MPI_DEFAULTS = {"OMPI_MCA_coll_libnbc_ireduce_algorithm": "2", "THP_MEM_ALLOC_ENABLE": "1"}


def run(args: argparse.Namespace) -> int:
    import os

    for key, value in MPI_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from hpcsrl.cli.pretrain import parse_method_options, split_options
    from hpcsrl.errors import UserError
    from hpcsrl.pipeline.emulate import parse_slowdown, parse_time_scale
    from hpcsrl.pipeline.run import DhpOptions
    from hpcsrl.pipeline.run import run as run_dhp
    from hpcsrl.planning.quantities import parse_sizes

    if args.data is None and args.emulate is None:
        raise UserError("--data is required (or --emulate PROFILE for an emulated run)")
    if (args.slowdown or args.time_scale != "1") and args.emulate is None:
        raise UserError("--time-scale and --slowdown go with --emulate PROFILE")
    memory = None
    if args.memory is not None:
        sizes = parse_sizes(args.memory, "--memory")
        if len(sizes) != 1:
            raise UserError("--memory takes one size for every node")
        memory = sizes[0]
    options = parse_method_options(args.method, args.method_option) if args.method else {}
    o = DhpOptions(plan=args.plan, data=args.data or "", out=args.out, bands=args.bands,
                   chains=args.chains, iterations=args.iterations, epochs=args.epochs,
                   aggregate_every=args.aggregate_every, resume=args.resume,
                   stop_after=args.stop_after, timeout=args.timeout, memory=memory,
                   method=args.method, backbone=args.backbone, batch_size=args.batch_size,
                   input_size=args.input_size, lr=args.lr, weight_decay=args.weight_decay,
                   momentum=args.momentum, seed=args.seed, limit=args.limit,
                   monitor_samples=args.monitor_samples, augment=args.augment,
                   pretrain_on=args.pretrain_on, split=args.split,
                   split_options=split_options(args), method_options=options,
                   wait=args.wait, threads=args.threads,
                   emulate=args.emulate, time_scale=parse_time_scale(args.time_scale),
                   slowdown=parse_slowdown(args.slowdown))
    return run_dhp(o)
